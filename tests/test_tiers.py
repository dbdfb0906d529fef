"""Tier tensors and the copy primitive: every read path returns the bytes that were written."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from flexgen_dist.storage.tiers import DiskIO, DiskTensor, MemoryTensor, copy, to_compute


@pytest.mark.parametrize("io", [DiskIO(), DiskIO(direct=True), DiskIO(drop_page_cache=True)], ids=["buffered", "direct", "drop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_disk_rows_round_trip_at_unaligned_offsets(tmp_path, io, dtype):
    data = torch.randn(37, 3, 5).to(dtype)  # 15 values a row: rows never start on a 4 KiB boundary
    t = DiskTensor(tmp_path / "x.bin", data.shape, dtype, io=io)
    t.write(slice(0, 37), data)
    assert torch.equal(t.read(), data)
    assert torch.equal(t.read(slice(11, 29)), data[11:29])
    t.write(slice(5, 6), torch.zeros(1, 3, 5, dtype=dtype))
    assert torch.equal(t.read(slice(4, 7))[1], torch.zeros(3, 5, dtype=dtype))


def test_parallel_chunked_read_equals_plain_read(tmp_path):
    data = torch.randn(1000, 64).half()
    t = DiskTensor(tmp_path / "w.bin", data.shape, torch.float16, io=DiskIO(chunk_bytes=4096, threads=3))
    t.write(slice(None), data)
    with ThreadPoolExecutor(3) as pool:
        got = to_compute(t, slice(None), torch.device("cpu"), torch.float32, pool)
    assert got.dtype == torch.float32 and torch.equal(got, data.float())


def test_copy_primitive_is_dst_index_assign_src_index(tmp_path):
    src = MemoryTensor(torch.arange(24.0).view(6, 4), "cpu")
    dst = DiskTensor(tmp_path / "d.bin", (6, 4), torch.float32)
    dst.write(slice(None), torch.zeros(6, 4))
    copy(dst, slice(2, 4), src, slice(0, 2))
    expected = torch.zeros(6, 4)
    expected[2:4] = torch.arange(8.0).view(2, 4)
    assert torch.equal(dst.read(), expected)


def test_gpu_tier_read_is_a_view_not_a_copy():
    t = MemoryTensor(torch.ones(4, 4), "gpu")
    out = to_compute(t, slice(None), torch.device("cpu"), torch.float32)
    assert out.data_ptr() == t.data.data_ptr()
