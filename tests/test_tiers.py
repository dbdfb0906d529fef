"""Tier tensors and the copy primitive: every read path returns the bytes that were written."""

import pytest
import torch

from flexgen_dist.planning.placement import READ_ALIGN, Tier, pack
from flexgen_dist.storage.slots import SlotPool
from flexgen_dist.storage.tiers import DiskIO, DiskReader, DiskTensor, MemoryTensor, copy, to_compute


def reader(io=DiskIO(), buffer_bytes=1 << 16):
    return DiskReader(io, buffer_bytes)


def read_all(t: DiskTensor, index=slice(None)) -> torch.Tensor:
    start, stop, _ = index.indices(t.shape[0])
    out = torch.empty((stop - start, *t.shape[1:]), dtype=t.dtype)
    return t.read_into(out, index)


@pytest.mark.parametrize("io", [DiskIO(), DiskIO(direct=True), DiskIO(drop_page_cache=True)], ids=["buffered", "direct", "drop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_disk_rows_round_trip_at_unaligned_offsets(tmp_path, io, dtype):
    data = torch.randn(37, 3, 5).to(dtype)  # 15 values a row: rows never start on a 4 KiB boundary
    t = DiskTensor(tmp_path / "x.bin", data.shape, dtype, reader(io))
    t.write(slice(0, 37), data)
    assert torch.equal(read_all(t), data)
    assert torch.equal(read_all(t, slice(11, 29)), data[11:29])
    t.write(slice(5, 6), torch.zeros(1, 3, 5, dtype=dtype))
    assert torch.equal(read_all(t, slice(4, 7))[1], torch.zeros(3, 5, dtype=dtype))


@pytest.mark.parametrize("direct", [False, True])
def test_parallel_chunked_read_equals_plain_read_with_a_fixed_number_of_buffers(tmp_path, direct):
    data = torch.randn(1000, 64).half()  # 128 KB: 12 chunks of 10 KiB rows-worth each
    r = DiskReader(DiskIO(threads=3, direct=direct), buffer_bytes=10 * 1024 + 2 * READ_ALIGN)
    t = DiskTensor(tmp_path / "w.bin", data.shape, torch.float16, r)
    t.write(slice(None), data)
    got = to_compute(t, slice(None), torch.device("cpu"), torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, data.float())
    assert len(r.buffers) == 3  # reads never allocate more buffers than threads
    r.close()


def test_copy_primitive_is_dst_index_assign_src_index(tmp_path):
    src = MemoryTensor(torch.arange(24.0).view(6, 4), Tier.CPU)
    dst = DiskTensor(tmp_path / "d.bin", (6, 4), torch.float32, reader())
    dst.write(slice(None), torch.zeros(6, 4))
    copy(dst, slice(2, 4), src, slice(0, 2))
    expected = torch.zeros(6, 4)
    expected[2:4] = torch.arange(8.0).view(2, 4)
    assert torch.equal(read_all(dst), expected)
    # disk to plain tensor, converting the dtype
    out = torch.full((6, 4), -1.0, dtype=torch.float64)
    copy(out, slice(1, 3), dst, slice(2, 4))
    assert torch.equal(out[1:3], expected[2:4].double()) and bool((out[0] == -1).all())


def test_gpu_tier_read_is_a_view_not_a_copy():
    t = MemoryTensor(torch.ones(4, 4), Tier.GPU)
    out = to_compute(t, slice(None), torch.device("cpu"), torch.float32)
    assert out.data_ptr() == t.data.data_ptr()


def test_short_writes_are_completed_not_ignored(tmp_path, monkeypatch):
    import os

    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(fd, bytes(data)[:7], offset))  # 7 bytes at a time
    data = torch.randn(9, 5)
    t = DiskTensor(tmp_path / "s.bin", data.shape, torch.float32, reader())
    t.write(slice(None), data)
    monkeypatch.undo()
    assert torch.equal(read_all(t), data)


def test_slot_pool_lends_a_fixed_number_of_slots():
    pieces, nbytes = pack([("w", "value", (2, 3), "float32"), ("w", "data", (5,), "uint8"), ("b", "value", (4,), "float16")])
    assert [p.offset for p in pieces] == [0, 256, 512] and nbytes == 768  # each piece on a 256-byte boundary
    pool = SlotPool(2, nbytes, torch.device("cpu"))
    a, b = pool.take(), pool.take()
    assert a.index != b.index and pool.num_free == 0
    pool.give(a)
    c = pool.take()
    assert c is a
    view = c.view(pieces[2])
    assert view.dtype == torch.float16 and view.shape == (4,) and view.data_ptr() == a.data.data_ptr() + 512
    assert c.view(pieces[0], rows=1).shape == (1, 3)
