"""One tensor type per tier and one copy primitive.

- `MemoryTensor`: a torch tensor on the gpu tier (the compute device) or the cpu tier (host
  memory, pinned where a CUDA device makes that pay). On a machine with no GPU both tiers are
  host memory.
- `DiskTensor`: a raw little-endian file in the offload folder, read with large sequential
  reads into a reusable host buffer.

Indexing: `read(rows)` / `write(rows, value)` take a slice of the LEADING dimension only. That
is the access pattern of every tensor we tier (a KV cache is laid out (seq, batch, heads, dim),
so a decode step appends one contiguous row and reads one contiguous prefix), and it keeps every
disk access a single sequential read or write.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

_ALL = slice(None)


def _rows(index: slice, length: int) -> tuple[int, int]:
    start, stop, step = index.indices(length)
    if step != 1:
        raise ValueError("tier tensors are indexed by a contiguous slice of the leading dimension")
    return start, max(start, stop)


class MemoryTensor:
    def __init__(self, data: torch.Tensor, tier: str):
        self.data = data
        self.tier = tier

    @classmethod
    def empty(cls, shape, dtype, device: torch.device, tier: str, pin: bool = False) -> "MemoryTensor":
        data = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin and device.type == "cpu")
        return cls(data, tier)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def read(self, index: slice = _ALL) -> torch.Tensor:
        return self.data[index]  # a view: no copy

    def write(self, index: slice, value: torch.Tensor) -> None:
        self.data[index].copy_(value, non_blocking=True)


@dataclass(frozen=True)
class DiskIO:
    """How disk-tier reads are done."""

    direct: bool = False  # O_DIRECT: bypass the page cache (falls back to buffered where unsupported)
    drop_page_cache: bool = False  # buffered, but evict what was read: the next read hits the disk
    threads: int = 2  # one tensor's rows are read in parallel chunks by this many threads
    chunk_bytes: int = 8 << 20


_ALIGN = 4096  # O_DIRECT wants the offset, length and buffer address aligned


class ReadBuffers:
    """Reusable, 4 KiB-aligned read buffers, one per thread, shared by many disk tensors.

    Shared so memory stays (threads x largest read), not (threads x tensors x read)."""

    def __init__(self):
        self._local = threading.local()

    def get(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes + _ALIGN:
            buf = torch.empty(nbytes + 2 * _ALIGN, dtype=torch.uint8)
            self._local.buf = buf
        skip = (-buf.data_ptr()) % _ALIGN
        return buf[skip : skip + nbytes + _ALIGN]


class DiskTensor:
    """A tensor stored as a raw file; the file is created (or reused) at construction."""

    tier = "disk"

    def __init__(
        self,
        path: str | Path,
        shape,
        dtype: torch.dtype,
        create: bool = True,
        io: DiskIO = DiskIO(),
        buffers: ReadBuffers | None = None,
    ):
        self.path = Path(path)
        self.io = io
        self._buffers = buffers if buffers is not None else ReadBuffers()
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self._row_bytes = torch.Size(self.shape[1:]).numel() * torch.empty((), dtype=dtype).element_size()
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                f.truncate(self.nbytes)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._row_bytes

    def read(self, index: slice = _ALL) -> torch.Tensor:
        """Rows `index` as a host tensor. It lives in this thread's read buffer, which the next
        read on this thread overwrites, so copy it (e.g. to the compute device / dtype) before then."""
        start, stop = _rows(index, self.shape[0])
        first, nbytes = start * self._row_bytes, (stop - start) * self._row_bytes
        lead = first % _ALIGN if self.io.direct else 0  # O_DIRECT reads from the aligned offset below
        span = -(-(lead + nbytes) // _ALIGN) * _ALIGN if self.io.direct else nbytes
        buf = self._buffers.get(span)
        got = _pread_all(self.path, buf[:span], first - lead, self.io)
        if got < lead + nbytes:
            raise IOError(f"{self.path} is shorter than expected ({got - lead} of {nbytes} bytes at {first})")
        return buf[lead : lead + nbytes].view(self.dtype).view((stop - start, *self.shape[1:]))

    def read_into(self, out: torch.Tensor, pool=None, rows: int | None = None) -> torch.Tensor:
        """The first `rows` rows (default all) into out[:rows] (any device / dtype), in row chunks
        spread over `pool`'s threads."""
        n = self.shape[0] if rows is None else rows
        rows_per_chunk = max(1, self.io.chunk_bytes // max(1, self._row_bytes))
        chunks = [slice(a, min(a + rows_per_chunk, n)) for a in range(0, n, rows_per_chunk)]

        def one(rows: slice) -> None:
            out[rows].copy_(self.read(rows))

        if pool is None or len(chunks) == 1:
            for rows in chunks:
                one(rows)
        else:
            for fut in [pool.submit(one, rows) for rows in chunks]:
                fut.result()
        return out

    def write(self, index: slice, value: torch.Tensor) -> None:
        start, stop = _rows(index, self.shape[0])
        data = value.detach().to("cpu", self.dtype).contiguous()
        if tuple(data.shape) != (stop - start, *self.shape[1:]):
            raise ValueError(f"write of shape {tuple(data.shape)} into rows {start}:{stop} of {self.shape}")
        raw = data.view(-1).view(torch.uint8).numpy()
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, memoryview(raw), start * self._row_bytes)
        finally:
            os.close(fd)


def _pread_all(path: Path, buf: torch.Tensor, offset: int, io: DiskIO) -> int:
    """Read len(buf) bytes at offset (fewer at the end of the file); returns the count."""
    flags = os.O_RDONLY
    if io.direct:
        flags |= getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # a file system without O_DIRECT (tmpfs): buffered instead
        fd = os.open(path, os.O_RDONLY)
    try:
        view = memoryview(buf.numpy())
        got = 0
        while got < len(view):
            try:
                n = os.preadv(fd, [view[got:]], offset + got)
            except OSError:
                if not io.direct:
                    raise
                os.close(fd)  # O_DIRECT refused at read time: go on buffered
                fd = os.open(path, os.O_RDONLY)
                n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                break
            got += n
        if io.drop_page_cache:
            os.posix_fadvise(fd, offset, got, os.POSIX_FADV_DONTNEED)
        return got
    finally:
        os.close(fd)


TierTensor = MemoryTensor | DiskTensor


class BufferPool:
    """Reusable tensors by shape on one device and dtype, so loads do not allocate every step
    (a fresh multi-MB tensor costs page faults each time). Thread-safe."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        self._free: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._lent: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def take(self, shape) -> torch.Tensor:
        shape = tuple(shape)
        with self._lock:
            free = self._free.get(shape)
            buf = free.pop() if free else torch.empty(shape, dtype=self.dtype, device=self.device)
            self._lent[id(buf)] = buf
            return buf

    def give(self, tensors) -> None:
        """Return tensors taken from this pool; others are ignored."""
        with self._lock:
            for t in tensors:
                if self._lent.pop(id(t), None) is not None:
                    self._free.setdefault(tuple(t.shape), []).append(t)


def copy(dst, dst_index: slice, src, src_index: slice = _ALL) -> None:
    """The one copy primitive: equivalent to `dst[dst_index] = src[src_index]`.

    `dst` and `src` are each a `MemoryTensor`, a `DiskTensor` or a plain torch tensor; indices
    are slices of the leading dimension. Dtype and device are converted to the destination's.
    """
    value = src.read(src_index) if isinstance(src, (MemoryTensor, DiskTensor)) else src[src_index]
    if isinstance(dst, (MemoryTensor, DiskTensor)):
        dst.write(dst_index, value)
    else:
        dst[dst_index].copy_(value, non_blocking=value.is_pinned() or value.device.type != "cpu")


def to_compute(src, index: slice, device: torch.device, dtype: torch.dtype, pool=None) -> torch.Tensor:
    """Rows of a tier tensor as a tensor on the compute device in the compute dtype.

    No copy when the rows already live there in that dtype (the gpu tier). A whole disk tensor
    is read in parallel row chunks on `pool` when one is given."""
    if isinstance(src, DiskTensor) and index == _ALL and pool is not None:
        return src.read_into(torch.empty(src.shape, dtype=dtype, device=device), pool)
    value = src.read(index)
    if value.device == device and value.dtype == dtype and isinstance(src, MemoryTensor):
        return value
    out = torch.empty(value.shape, dtype=dtype, device=device)
    copy(out, _ALL, value)
    return out
