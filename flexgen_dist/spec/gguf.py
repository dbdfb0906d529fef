"""Read and check a GGUF file's header (llama.cpp's format) without reading its tensors (no torch).

The format, versions 2 and 3, little-endian: b"GGUF", u32 version, u64 tensor count, u64 metadata
count; the metadata as (string key, u32 value type, value), a string being a u64 length and UTF-8
bytes, an array a u32 element type, a u64 count and the elements; the tensor table as (string name,
u32 dimension count, u64 sizes fastest-moving first, u32 ggml type, u64 offset into the data); the
data from the next multiple of `general.alignment` (default 32). Everything a reader could trip over
later (a length past the end, a tensor past the file's end, a type the gguf package does not know)
is one line naming the file here, before any weight is placed. The values are read with plain struct
reads of the header's bytes: gguf's own GGUFReader builds an object per vocabulary entry (seconds for
a 150k-token vocabulary), and a tensor's bytes are read later with plain file reads (an I/O error is
an exception, where a memory map would die of SIGBUS).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, file_error

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 counted in 32 bits; llama.cpp has written v3 since 2023
ARCHITECTURES = ("llama", "qwen2", "qwen3")  # general.architecture we run (llama.cpp writes Mistral as llama)
FLOAT_TYPES = {0: "float32", 1: "float16", 30: "bfloat16"}  # ggml type ids of plain values
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8
_REDO = "the file is damaged or truncated; download it again"


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's bytes lie in the file, and how they are stored."""

    name: str  # llama.cpp's name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # torch's order: rows first
    ggml_type: int  # 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, 12 Q4_K, 30 BF16, ...
    type_name: str  # "Q4_K", as the gguf package names it
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array, read past (a vocabulary takes most of a header): its element type and length."""

    element_type: int
    count: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    size: int  # of the file, in bytes
    version: int
    metadata: dict  # key -> a number, a string, or a GGUFArray
    tensors: dict[str, GGUFTensor]
    data_start: int
    digest: str  # sha256 of every byte before the data (metadata and tensor table)

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]


def is_gguf(path: str | Path) -> bool:
    """The file starts with GGUF's magic bytes (False for anything unreadable)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The header of the GGUF file `path`, every tensor checked against the file's size."""
    path = Path(path)
    try:
        import gguf  # the block sizes of its types; imported only for a GGUF file
    except ImportError:
        raise UserError(f"{str(path)!r}: reading a GGUF file needs the gguf package; pip install gguf") from None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if f.read(4) != MAGIC:
                raise UserError(f"{str(path)!r} is not a GGUF file (it does not start with the bytes 'GGUF'); "
                                "pass a .gguf model file or a Hugging Face model folder")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                return _parse(path, blob, size, gguf)
    except OSError as exc:
        raise file_error(exc, path, "read") from None


def _parse(path: Path, blob: mmap.mmap, size: int, gguf) -> GGUFHeader:
    reader = _Reader(blob, size)
    try:
        version = reader.unpack("<I")
        if version not in VERSIONS:
            raise UserError(f"{str(path)!r} is GGUF version {version}; versions {' and '.join(map(str, VERSIONS))} "
                            "are supported (convert it again with a current llama.cpp)")
        tensor_count, metadata_count = reader.unpack("<Q"), reader.unpack("<Q")
        metadata = {}
        for _ in range(metadata_count):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("<I"))
        entries = [_entry(reader) for _ in range(tensor_count)]
    except _Short as exc:
        raise UserError(f"{str(path)!r} ends inside its header ({exc}): {_REDO}") from None
    except UnicodeDecodeError:
        raise UserError(f"{str(path)!r} has a name in its header that is not UTF-8: {_REDO}") from None
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise UserError(f"{str(path)!r} has no general.architecture in its metadata: {_REDO}")
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise UserError(f"{str(path)!r} has general.alignment {alignment!r}, not a positive whole number: {_REDO}")
    data_start = -(-reader.pos // alignment) * alignment
    tensors = {}
    for name, dims, ggml_type, offset in entries:
        tensor = _tensor(gguf, path, name, dims, ggml_type, data_start + offset)
        if tensor.offset + tensor.nbytes > size:
            raise UserError(f"{str(path)!r} is truncated: tensor {name!r} ends at byte {tensor.offset + tensor.nbytes} "
                            f"but the file has {size} bytes; download it again")
        tensors[name] = tensor
    digest = hashlib.sha256(blob[:min(data_start, size)]).hexdigest()
    return GGUFHeader(path, size, version, metadata, tensors, data_start, digest)


def _entry(reader: "_Reader") -> tuple[str, tuple[int, ...], int, int]:
    name = reader.string()
    count = reader.unpack("<I")
    if count > _MAX_DIMS:
        raise _Short(f"tensor {name!r} claims {count} dimensions")
    dims = tuple(reader.unpack("<Q") for _ in range(count))
    return name, tuple(reversed(dims)), reader.unpack("<I"), reader.unpack("<Q")


def _tensor(gguf, path: Path, name: str, shape: tuple[int, ...], ggml_type: int, offset: int) -> GGUFTensor:
    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise UserError(f"{str(path)!r}: tensor {name!r} has ggml type {ggml_type}, which the installed gguf package "
                        "does not know; pip install -U gguf (or the file is damaged)") from None
    numel = 1
    for dim in shape:
        numel *= dim
    if shape and shape[-1] % block:
        raise UserError(f"{str(path)!r}: tensor {name!r} of shape {shape} is {qtype.name}, whose blocks of {block} "
                        f"values do not divide its rows: {_REDO}")
    return GGUFTensor(name, shape, ggml_type, qtype.name, offset, numel // block * block_bytes)


class _Short(Exception):
    """The header claims more bytes than the file has."""


class _Reader:
    """Little-endian values from the header's bytes, advancing `pos`."""

    def __init__(self, blob: mmap.mmap, size: int):
        self.blob, self.size, self.pos = blob, size, 4

    def take(self, count: int) -> int:
        """Skip `count` bytes; where they started."""
        start = self.pos
        if count > self.size - start:
            raise _Short(f"{count} bytes wanted at byte {start} of {self.size}")
        self.pos += count
        return start

    def unpack(self, fmt: str):
        return struct.unpack_from(fmt, self.blob, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        start = self.take(length)
        return self.blob[start:start + length].decode("utf-8")

    def value(self, value_type: int):
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type != _ARRAY:
            raise _Short(f"metadata value type {value_type} is not one of GGUF's")
        element_type, count = self.unpack("<I"), self.unpack("<Q")
        if element_type in _SCALARS:
            self.take(count * struct.calcsize(_SCALARS[element_type]))
        elif element_type == _STRING:  # a vocabulary or merges: skipped, not decoded
            for _ in range(count):
                self.take(self.unpack("<Q"))
        else:
            for _ in range(count):
                self.value(element_type)
        return GGUFArray(element_type, count)
