"""One tensor type per tier and one copy primitive.

- `MemoryTensor`: a torch tensor on the gpu tier (the compute device) or the cpu tier (host
  memory, pinned where a CUDA device makes that pay). On a machine with no GPU both tiers are
  host memory.
- `DiskTensor`: a raw little-endian file in the offload folder. Reads go through a `DiskReader`:
  a fixed set of aligned buffers and threads, so what disk reads cost in memory is known in
  advance (the placement counts it) whatever the tensor sizes.

Indexing: reads and writes take a slice of the LEADING dimension only. That is the access
pattern of every tensor we tier (a KV cache is laid out (seq, batch, heads, dim), so a decode
step appends one contiguous row and reads one contiguous prefix), and it keeps every disk access
a single sequential read or write.

Every tier tensor names its layout (`layout_of`): "dense" here, "groups" for a quantized one
(storage/quantize.py `CompressedTensor`), "kivi" for KIVI's cache (storage/kivi.py), so code that
reads any of them branches on the name and a run without compression never imports those modules.

`copy(dst, dst_index, src, src_index)` is equivalent to `dst[dst_index] = src[src_index]` for any
pair of tier tensors or plain tensors, converting dtype and device to the destination's.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import pwrite_all
from ..errors import file_error
from ..planning.placement import READ_ALIGN, Tier

ALL = slice(None)  # every row of a tier tensor


def _rows(index: slice, length: int) -> tuple[int, int]:
    start, stop, step = index.indices(length)
    if step != 1:
        raise ValueError("tier tensors are indexed by a contiguous slice of the leading dimension")
    return start, max(start, stop)


def layout_of(tensor) -> str:
    """"dense", "groups" or "kivi" (the module's docstring); a plain torch tensor is dense."""
    return getattr(tensor, "LAYOUT", "dense")


class MemoryTensor:
    LAYOUT = "dense"

    def __init__(self, data: torch.Tensor, tier: Tier):
        self.data = data
        self.tier = tier

    @classmethod
    def empty(cls, shape, dtype, device: torch.device, tier: Tier, pin: bool = False) -> "MemoryTensor":
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

    def read(self, index: slice = ALL) -> torch.Tensor:
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

    def __post_init__(self) -> None:
        if self.threads < 1 or self.chunk_bytes < READ_ALIGN:
            raise ValueError(f"DiskIO needs threads >= 1 and chunk_bytes >= {READ_ALIGN}")


class DiskReader:
    """`io.threads` aligned host buffers of `buffer_bytes` each and as many reading threads.

    A read of many rows is cut into chunks of whole rows that fit a buffer; each chunk is read
    into a free buffer and copied to its destination (any device, any dtype). On a CUDA machine
    the buffers are pinned, so that copy is asynchronous; the buffer is reused only once the
    copy has finished."""

    def __init__(self, io: DiskIO, buffer_bytes: int, pin: bool = False):
        self.io = io
        self.buffer_bytes = buffer_bytes
        self.buffers: list[torch.Tensor] = [
            torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(io.threads)
        ]
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        for buf in self.buffers:
            self._free.put(buf)
        self._pool = ThreadPoolExecutor(io.threads, thread_name_prefix="flexgen-read") if io.threads > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def read_into(self, out: torch.Tensor, src: "DiskTensor", start: int, stop: int) -> None:
        """out[:stop - start] = rows start:stop of src. Into device memory, every chunk is copied on
        the caller's current stream (a loader's), also from the reader threads: on a thread of
        their own the copies would go to the device's default stream, the compute stream."""
        row_bytes = src.row_bytes
        rows_per_chunk = max(1, (self.buffer_bytes - 2 * READ_ALIGN) // max(1, row_bytes))
        chunks = [(a, min(a + rows_per_chunk, stop)) for a in range(start, stop, rows_per_chunk)]
        stream = torch.cuda.current_stream(out.device) if out.device.type == "cuda" else None
        if self._pool is None or len(chunks) == 1:
            for a, b in chunks:
                self._read_chunk(out, src, start, a, b, stream)
            return
        for fut in [self._pool.submit(self._read_chunk, out, src, start, a, b, stream) for a, b in chunks]:
            fut.result()

    def _read_chunk(self, out: torch.Tensor, src: "DiskTensor", base: int, start: int, stop: int, stream) -> None:
        first, nbytes = start * src.row_bytes, (stop - start) * src.row_bytes
        lead = first % READ_ALIGN if self.io.direct else 0  # O_DIRECT reads from the aligned offset below
        span = -(-(lead + nbytes) // READ_ALIGN) * READ_ALIGN if self.io.direct else nbytes
        raw = self._free.get()
        try:
            skip = (-raw.data_ptr()) % READ_ALIGN
            buf = raw[skip : skip + span]
            got = _pread_all(src.path, buf, first - lead, self.io)
            if got < lead + nbytes:
                raise OSError(f"{src.path} is shorter than expected ({got - lead} of {nbytes} bytes at {first})")
            rows = buf[lead : lead + nbytes].view(src.dtype).view((stop - start, *src.shape[1:]))
            dst = out[start - base : stop - base]
            if stream is None:
                dst.copy_(rows)
                return
            with torch.cuda.stream(stream):
                dst.copy_(rows, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(stream)
            copied.synchronize()  # the buffer is reused next: wait for this copy only, not the compute stream
        finally:
            self._free.put(raw)


class DiskTensor:
    """A tensor stored as a raw file; the file is created (or reused) at construction."""

    tier = Tier.DISK
    LAYOUT = "dense"

    def __init__(self, path: str | Path, shape, dtype: torch.dtype, reader: DiskReader, create: bool = True):
        self.path = Path(path)
        self.reader = reader
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.row_bytes = torch.Size(self.shape[1:]).numel() * torch.empty((), dtype=dtype).element_size()
        if create:  # a new file of the block's own private folder: never an existing one, never a link
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    os.ftruncate(fd, self.nbytes)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise file_error(exc, self.path, "create") from None

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def read_into(self, out: torch.Tensor, index: slice = ALL, staging=None) -> torch.Tensor:
        """Rows `index` into out[:rows] (any device / dtype), in chunks on the reader's threads.
        (`staging` is for compressed tensors' reads; a plain file needs none.)"""
        start, stop = _rows(index, self.shape[0])
        self.reader.read_into(out, self, start, stop)
        return out

    def write(self, index: slice, value: torch.Tensor) -> None:
        start, stop = _rows(index, self.shape[0])
        data = value.detach().to("cpu", self.dtype).contiguous()
        if tuple(data.shape) != (stop - start, *self.shape[1:]):
            raise ValueError(f"write of shape {tuple(data.shape)} into rows {start}:{stop} of {self.shape}")
        view = memoryview(data.view(-1).view(torch.uint8).numpy())
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
            try:  # a short write goes on; one that writes nothing, a full disk, EIO: EnvironmentFailure
                pwrite_all(fd, view, start * self.row_bytes, self.path)
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk mid-run: one line, exit 1
            raise file_error(exc, self.path, "write") from None


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


TierTensor = MemoryTensor | DiskTensor  # or a storage.compressed.CompressedTensor, of three of them


def copy(dst, dst_index: slice, src, src_index: slice = ALL, staging=None) -> None:
    """The one copy primitive: equivalent to `dst[dst_index] = src[src_index]`.

    `dst` and `src` are each a tier tensor (`MemoryTensor`, `DiskTensor`, `CompressedTensor`) or a
    plain torch tensor; indices are slices of the leading dimension. Dtype and device are
    converted to the destination's; a compressed source is dequantized (through `staging` when
    its parts must first move), a compressed destination quantizes.
    """
    if not isinstance(src, (MemoryTensor, torch.Tensor)):  # a file or a compressed tensor reads itself
        if isinstance(dst, torch.Tensor):
            src.read_into(dst[dst_index], src_index, staging)
            return
        start, stop = _rows(src_index, src.shape[0])
        value = torch.empty((stop - start, *src.shape[1:]), dtype=getattr(src, "dtype", torch.float32))
        src.read_into(value, src_index, staging)
    else:
        value = src.read(src_index) if isinstance(src, MemoryTensor) else src[src_index]
    if isinstance(dst, torch.Tensor):
        dst[dst_index].copy_(value, non_blocking=value.is_pinned() or value.device.type != "cpu")
    else:
        dst.write(dst_index, value)


def read_rows(src, rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The rows at sorted, distinct positions `rows` of a tier tensor, as one (len(rows), ...)
    tensor on `device` in `dtype`: sparse attention reads only the values it uses. A file is
    read in runs of consecutive positions."""
    if isinstance(src, MemoryTensor):
        return src.data.index_select(0, rows.to(src.data.device)).to(device, dtype)
    if not isinstance(src, DiskTensor):
        return src.read_rows(rows, device, dtype)  # a compressed tensor
    out = torch.empty((len(rows), *src.shape[1:]), dtype=dtype, device=device)
    positions = rows.tolist()
    run_start = 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            first = positions[run_start]
            src.read_into(out[run_start:i], slice(first, first + i - run_start))
            run_start = i
    return out


def to_compute(src, index: slice, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Rows of a tier tensor as a tensor on the compute device in the compute dtype; no copy
    when they already live there in that dtype (the gpu tier)."""
    if isinstance(src, MemoryTensor):
        value = src.read(index)
        if value.device == device and value.dtype == dtype:
            return value
    start, stop = _rows(index, src.shape[0])
    out = torch.empty((stop - start, *src.shape[1:]), dtype=dtype, device=device)
    copy(out, ALL, src, index)
    return out


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a placement's dtype name ("float32", "float16", "bfloat16")."""
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
