"""A disk read into device memory copies on the caller's stream (a loader's), also for the chunks
its reader threads copy: on a thread of their own, those copies would go to the device's default
stream, the compute stream, and a layer's load would wait for the compute before it (no overlap),
and the compute for the load. Checked on the CPU with a recording stand-in for torch.cuda and a
host tensor that says it is on cuda:1 (tests/fake_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from fake_cuda import FakeCuda, FakeCudaTensor
from flexgen_dist.planning.placement import READ_ALIGN
from flexgen_dist.storage.tiers import DiskIO, DiskReader, DiskTensor


@pytest.mark.parametrize("threads", [1, 3])
def test_every_chunk_is_copied_on_the_callers_stream(tmp_path, monkeypatch, threads):
    data = torch.randn(1000, 64)  # 256 KB: 25 chunks of 40 rows (10 KiB)
    reader = DiskReader(DiskIO(threads=threads), buffer_bytes=10 * 1024 + 2 * READ_ALIGN)
    disk = DiskTensor(tmp_path / "w.bin", data.shape, data.dtype, reader)
    disk.write(slice(None), data)

    cuda = FakeCuda(monkeypatch, device_count=2)
    monkeypatch.setattr(FakeCudaTensor, "INDEX", 1)
    monkeypatch.setattr(FakeCudaTensor, "cuda", cuda)
    out = torch.zeros(1000, 64).as_subclass(FakeCudaTensor)
    loader_stream = torch.cuda.Stream(torch.device("cuda:1"))
    try:
        with torch.cuda.stream(loader_stream):  # as on a loader thread
            disk.read_into(out)
    finally:
        reader.close()
    assert torch.equal(out.as_subclass(torch.Tensor), data)
    copies = cuda.calls("copy")
    assert len(copies) == 25
    if threads > 1:
        assert any(thread.startswith("flexgen-read") for _, _, thread in copies)  # the parallel path
    assert {stream for _, stream, _ in copies} == {loader_stream.name}  # never the default (compute) stream
    # a bounce buffer is reused only once its copy is done: waited for on the loader's stream alone
    assert not [e for e in cuda.log if e[0] == "stream_synchronize" and e[1] != loader_stream.name]
    recorded = {name: stream for _, name, stream in cuda.calls("event_record")}
    waited = [name for _, name in cuda.calls("event_synchronize")]
    synced = [stream for _, stream in cuda.calls("stream_synchronize")]
    assert len(waited) + len(synced) >= len(copies) and set(recorded[name] for name in waited) <= {loader_stream.name}
