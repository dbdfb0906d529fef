"""The micro-benchmarks behind `python -m flexgen_dist.profile`: copies, disk, GEMMs, attention,
4-bit (de)quantization. Each returns a rate; flops are counted as `machine/hardware.py` says.

Times are medians of a few repeats after a warm-up call, with CUDA events on a GPU (the host
does not wait on each kernel) and perf_counter on the CPU.
"""

from __future__ import annotations

import errno
import mmap
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..files import remove_stale_temps
from .hardware import DECODE_MATMUL_ROWS, Speeds
from ..sizes import format_size
from ..temp_names import temp_name

DISK_CHUNK = 8 << 20  # bytes per read/write call; the engine's DiskIO reads 8 MiB chunks too
PROBE_NAME = "disk-probe"  # the scratch file measured: temp_name(PROBE_NAME) in the measured folder


@dataclass(frozen=True)
class Shapes:
    """How big each micro-benchmark is. The full set takes about a minute on a 2-core CPU."""

    copy_bytes: int
    disk_bytes: int  # well above a disk's own cache, so the medium is measured
    dim: int  # GEMM (rows, dim) x (dim, dim)
    prefill_rows: int
    decode_rows: int  # one GPU batch: below this, a decode GEMM takes about as long (memory bound)
    prefill_attention: tuple[int, int, int, int]  # (batch, heads, seq, head_dim), causal
    decode_attention: tuple[int, int, int, int]  # (batch, heads, cached seq, head_dim), one query
    cpu_attention: tuple[int, int, int, int]
    quant_side: int  # a (side, side) tensor
    repeats: int

    @classmethod
    def for_device(cls, device: torch.device, quick: bool) -> Shapes:
        if quick:
            # 256 MiB of disk: a 64 MiB test measured a burst (1.42 GB/s where 1 GiB sustains 0.72-0.85)
            return cls(32 << 20, 256 << 20, 1024, 512, DECODE_MATMUL_ROWS, (1, 8, 256, 64), (8, 16, 512, 64),
                       (4, 8, 512, 64), 1024, 3)
        if device.type == "cuda":
            return cls(512 << 20, 1 << 30, 4096, 4096, DECODE_MATMUL_ROWS, (4, 32, 2048, 128), (32, 32, 2048, 128),
                       (8, 16, 1024, 64), 2048, 7)
        return cls(256 << 20, 1 << 30, 2048, 2048, DECODE_MATMUL_ROWS, (2, 16, 1024, 64), (8, 16, 1024, 64),
                   (8, 16, 1024, 64), 2048, 5)


def _seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            tic = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tic)
    return statistics.median(times)


# --- copies -------------------------------------------------------------------------------------


def copy_bandwidths(device: torch.device, nbytes: int, repeats: int) -> tuple[float, float]:
    """(host-to-device, device-to-host) bytes/s: pinned host memory <-> the GPU; without a GPU a
    host memory copy, which is what moving between the two host tiers costs."""
    if device.type != "cuda":
        src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        bw = nbytes / _seconds(lambda: dst.copy_(src), device, repeats)
        return bw, bw
    host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = nbytes / _seconds(lambda: dev.copy_(host, non_blocking=True), device, repeats)
    d2h = nbytes / _seconds(lambda: host.copy_(dev, non_blocking=True), device, repeats)
    return h2d, d2h


# --- disk ---------------------------------------------------------------------------------------


def _io_pass(path: Path, buf: mmap.mmap, nbytes: int, *, write: bool, direct: bool) -> float:
    """Seconds to write (then fsync) or read nbytes sequentially in len(buf) chunks."""
    flags = (os.O_WRONLY | os.O_NOFOLLOW) if write else os.O_RDONLY  # the file exists: created exclusively
    fd = os.open(path, flags | (os.O_DIRECT if direct else 0))
    try:
        if not write and not direct:  # buffered: evict the file's pages (clean: fsynced when written)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        tic = time.perf_counter()
        for offset in range(0, nbytes, len(buf)):
            done = os.pwritev(fd, [buf], offset) if write else os.preadv(fd, [buf], offset)
            if done < len(buf):
                raise OSError(errno.EIO, f"short {'write' if write else 'read'} at byte {offset + done} of {path}")
        if write:
            os.fsync(fd)
        return time.perf_counter() - tic
    finally:
        os.close(fd)


def _timed_io(path: Path, buf: mmap.mmap, nbytes: int, *, write: bool) -> tuple[float, bool]:
    """(seconds, whether O_DIRECT was used): O_DIRECT where the file system takes it (tmpfs and
    some others refuse it with EINVAL, at open or at the first transfer), else buffered."""
    for direct in (True, False) if hasattr(os, "O_DIRECT") else (False,):
        try:
            return _io_pass(path, buf, nbytes, write=write, direct=direct), direct
        except OSError as e:
            if not direct or e.errno != errno.EINVAL:
                raise
    raise AssertionError("unreachable: the buffered pass returns or raises")


SMALL_READ = 64 << 10  # the piece of the per-read latency test: a small KV-cache piece
SMALL_READS = 256


def disk_bandwidths(folder: Path, nbytes: int) -> tuple[float, float, float, str]:
    """(read, write) bytes/s of one file of nbytes in `folder`, the seconds each read call costs
    beyond its bytes (random SMALL_READ reads of the same file), and how the cache was bypassed.
    The data is random (a compressing file system would flatter zeros); the file is removed."""
    try:
        return _disk_bandwidths(folder, nbytes)
    except OSError as e:  # an environment failure: one line that says where
        raise OSError(e.errno, f"cannot measure the disk of {folder}: {e.strerror or e}") from None


def _disk_bandwidths(folder: Path, nbytes: int) -> tuple[float, float, float, str]:
    folder.mkdir(parents=True, exist_ok=True)
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    if free < 2 * nbytes:  # leave the disk at least as much as the test takes
        nbytes = (free // 2) // DISK_CHUNK * DISK_CHUNK
        if nbytes < 4 * DISK_CHUNK:
            raise UserError(f"{folder} has only {format_size(free)} free, too little to measure its "
                            "disk; free some space or give another --offload-dir")
    nbytes = max(DISK_CHUNK, nbytes // DISK_CHUNK * DISK_CHUNK)
    buf = mmap.mmap(-1, DISK_CHUNK)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(DISK_CHUNK))
    # A scratch file under this tool's temporary-name scheme (a shared /tmp: never a name someone
    # could plant a link at), created exclusively; those of killed profiles are removed first.
    remove_stale_temps(folder, PROBE_NAME)
    path = folder / temp_name(PROBE_NAME)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    try:
        write_s, direct_write = _timed_io(path, buf, nbytes, write=True)
        read_s, direct_read = _timed_io(path, buf, nbytes, write=False)
        per_read = _small_read_seconds(path, nbytes, direct=direct_read)
    finally:
        path.unlink(missing_ok=True)
        buf.close()
    read_bw = nbytes / read_s
    latency = max(0.0, per_read - SMALL_READ / read_bw)
    how = (f"read: {'O_DIRECT' if direct_read else 'posix_fadvise(DONTNEED), then buffered'}; "
           f"write: {'O_DIRECT' if direct_write else 'buffered'} + fsync; {format_size(nbytes)} file; "
           f"{SMALL_READS} random {format_size(SMALL_READ)} reads for the per-read cost")
    return read_bw, nbytes / write_s, latency, how


def _small_read_seconds(path: Path, nbytes: int, *, direct: bool) -> float:
    """Median seconds of one SMALL_READ read at a random aligned offset of the file."""
    import random

    buf = mmap.mmap(-1, SMALL_READ)  # page-aligned, as O_DIRECT needs
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        offsets = random.Random(0).sample(range(nbytes // SMALL_READ), min(SMALL_READS, nbytes // SMALL_READ))
        times = []
        for index in offsets:
            tic = time.perf_counter()
            if os.preadv(fd, [buf], index * SMALL_READ) < SMALL_READ:
                raise OSError(errno.EIO, f"short read at byte {index * SMALL_READ} of {path}")
            times.append(time.perf_counter() - tic)
        return statistics.median(times)
    finally:
        os.close(fd)
        buf.close()


# --- compute ------------------------------------------------------------------------------------


def convert_bw(nbytes: int, repeats: int) -> float:
    """fp16 -> fp32 on the CPU into a reused buffer, as the engine converts weights into their
    slot: bytes/s of fp32 output."""
    src = torch.randn(nbytes // 4, dtype=torch.float16)
    dst = torch.empty(src.shape, dtype=torch.float32)
    return dst.numel() * 4 / _seconds(lambda: dst.copy_(src), torch.device("cpu"), repeats)


def matmul_flops(device: torch.device, dtype: torch.dtype, rows: int, dim: int, repeats: int) -> float:
    x = torch.randn(rows, dim, device=device, dtype=dtype)  # (rows, C)
    w = torch.randn(dim, dim, device=device, dtype=dtype)  # (C, C), as F.linear takes a weight
    return 2 * rows * dim * dim / _seconds(lambda: F.linear(x, w), device, repeats)


def elementwise_bw(device: torch.device, dtype: torch.dtype, rows: int, dim: int, repeats: int) -> float:
    """Bytes/s of `a * b` into a new tensor (two reads, one write), as a layer's norms, RoPE and
    residual adds do: a fresh output each time, so its page faults (or the allocator) count."""
    a = torch.randn(rows, dim, device=device, dtype=dtype)
    b = torch.randn(rows, dim, device=device, dtype=dtype)
    return 3 * a.numel() * a.element_size() / _seconds(lambda: a * b, device, repeats)


def attention_flops(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int],
                    repeats: int, *, decode: bool) -> float:
    """SDPA with a boolean mask as the engine passes one: causal prefill over `seq` tokens, or one
    query per sequence over `seq` cached keys. Flops counted dense: 4 * queries * keys * hidden."""
    B, nh, S, hd = shape
    T = 1 if decode else S
    q = torch.randn(B, nh, T, hd, device=device, dtype=dtype)  # (B, nh, T, hd)
    k = torch.randn(B, nh, S, hd, device=device, dtype=dtype)  # (B, nh, S, hd)
    v = torch.randn(B, nh, S, hd, device=device, dtype=dtype)
    if decode:
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=device)  # (B, 1, T, S)
    else:
        mask = torch.ones(S, S, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, T, S)
    seconds = _seconds(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), device, repeats)
    return 4 * B * T * S * nh * hd / seconds


QUANT_KERNEL = "storage/quantize.py (4-bit, groups of 64, into a pooled buffer as the engine does)"


def quant_bandwidths(device: torch.device, dtype: torch.dtype, side: int, repeats: int) -> tuple[float, float]:
    """(quantize, dequantize) bytes/s of the compute_dtype tensor (side, side), with the engine's
    own kernels: dequantization into an existing buffer (the weight slot, the KV scratch)."""
    from ..planning.compression import CompressionConfig
    from ..storage.quantize import dequantize, quantize

    config = CompressionConfig(bits=4, group_size=64)
    x = torch.randn(side, side, device=device, dtype=dtype)
    out = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    q = quantize(x, config)
    quantize_bw = nbytes / _seconds(lambda: quantize(x, config), device, repeats)
    dequantize_bw = nbytes / _seconds(lambda: dequantize(q, out=out), device, repeats)
    return quantize_bw, dequantize_bw


# --- all ----------------------------------------------------------------------------------------


def measure_speeds(device: torch.device, dtype: torch.dtype, offload_dir: Path, *, quick: bool) -> tuple[Speeds, tuple[str, ...]]:
    """Every speed of `Speeds`, and notes on how they were measured."""
    shapes = Shapes.for_device(device, quick)
    r = shapes.repeats
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the timing events record on the current device's stream
    h2d, d2h = copy_bandwidths(device, shapes.copy_bytes, r)
    disk_read, disk_write, disk_latency, disk_how = disk_bandwidths(offload_dir, shapes.disk_bytes)
    quantize, dequantize = quant_bandwidths(device, dtype, shapes.quant_side, r)
    speeds = Speeds(
        compute_dtype=str(dtype).removeprefix("torch."),
        h2d_bw=h2d,
        d2h_bw=d2h,
        disk_read_bw=disk_read,
        disk_write_bw=disk_write,
        matmul_flops=matmul_flops(device, dtype, shapes.prefill_rows, shapes.dim, r),
        decode_matmul_flops=matmul_flops(device, dtype, shapes.decode_rows, shapes.dim, r),
        attention_flops=attention_flops(device, dtype, shapes.prefill_attention, r, decode=False),
        decode_attention_flops=attention_flops(device, dtype, shapes.decode_attention, r, decode=True),
        cpu_attention_flops=attention_flops(torch.device("cpu"), dtype, shapes.cpu_attention, r, decode=True),
        quantize_bw=quantize,
        dequantize_bw=dequantize,
        elementwise_bw=elementwise_bw(device, dtype, 8 * shapes.prefill_rows, shapes.dim, r),  # 16 MiB+: not a cache's
        disk_read_latency=disk_latency,
        convert_bw=convert_bw(shapes.copy_bytes, r),
    )
    notes = (
        f"disk ({offload_dir}): {disk_how}",
        f"matmul: ({shapes.prefill_rows} and {shapes.decode_rows} rows, {shapes.dim}) x ({shapes.dim}, {shapes.dim})",
        f"attention (batch, heads, seq, head_dim): prefill {shapes.prefill_attention}, decode "
        f"{shapes.decode_attention}, cpu {shapes.cpu_attention}",
        f"quantize/dequantize: {QUANT_KERNEL}",
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads" + (" (quick)" if quick else ""),
    )
    return speeds, notes
