"""Read and check a safetensors file's header without reading its tensors (no torch).

The format: 8 bytes, the header length N (unsigned, little-endian); N bytes of UTF-8 JSON
`{"__metadata__": {...}, name: {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}}`
with offsets counted from the end of the header; then the tensors' bytes, back to back, filling
the rest of the file exactly. Everything a reader could trip over later (a length beyond the file,
an offset beyond the data, a truncated copy, bytes that are not JSON) is checked here, so a bad
file is one line naming the file and what is wrong, before any weight is placed.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, file_error

# safetensors' own limit: a larger header length means the file is not a safetensors file.
MAX_HEADER_BYTES = 100_000_000

# dtype -> bits per element, as the safetensors format names them.
DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
    "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32, "U16": 16, "U8": 8,
    "BOOL": 8, "C64": 64,
}

_REDO = "the file is truncated or not a safetensors file; re-download or re-save it"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in its file."""

    name: str
    path: Path
    dtype: str  # the safetensors name: "F16", "BF16", ...
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of the safetensors file `path`, checked against the file's size."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(8)
            if len(prefix) < 8:
                what = "is empty (0 bytes)" if size == 0 else f"is {size} bytes long, shorter than a safetensors header"
                raise UserError(f"{str(path)!r} {what}; {_REDO}")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                raise UserError(
                    f"{str(path)!r}: header length {header_len} exceeds the file size {size}: {_REDO}"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise file_error(exc, path, "read") from None
    if len(raw) < header_len:  # the file shrank while we read it
        raise UserError(f"{str(path)!r}: header cut short ({len(raw)} of {header_len} bytes); {_REDO}")
    header = _parse_json(path, raw)
    data_start = 8 + header_len
    entries = [_entry(path, name, value, data_start) for name, value in header.items() if name != "__metadata__"]
    _check_layout(path, entries, data_start, size)
    return {entry.name: entry for entry in entries}


def _parse_json(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{str(path)!r}: the header is not valid JSON ({_short(exc)}); {_REDO}") from None
    if not isinstance(header, dict):
        raise UserError(f"{str(path)!r}: the header is JSON but not an object of tensors; {_REDO}")
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        raise UserError(f"{str(path)!r}: the header's __metadata__ is not an object; {_REDO}")
    return header


def _entry(path: Path, name: str, value, data_start: int) -> TensorEntry:
    where = f"{str(path)!r}: tensor {name!r}"
    if not isinstance(value, dict):
        raise UserError(f"{where} has no dtype/shape/data_offsets in the header; {_REDO}")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise UserError(f"{where} has unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)}); {_REDO}")
    if not _ints(shape, 0):
        raise UserError(f"{where} has shape {shape!r}, not a list of sizes >= 0; {_REDO}")
    if not _ints(offsets, 2) or not 0 <= offsets[0] <= offsets[1]:
        raise UserError(f"{where} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end; {_REDO}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise UserError(
            f"{where} spans {offsets[1] - offsets[0]} bytes but its shape {tuple(shape)} of {dtype} needs "
            f"{bits / 8:g}; {_REDO}"
        )
    return TensorEntry(name=name, path=path, dtype=dtype, shape=tuple(shape), offset=data_start + offsets[0],
                       nbytes=offsets[1] - offsets[0])


def _check_layout(path: Path, entries: list[TensorEntry], data_start: int, size: int) -> None:
    """Tensors back to back from the end of the header to the end of the file, as the format
    (and the safetensors library) requires: a shorter file is truncated, a longer one corrupt."""
    end = data_start
    for entry in sorted(entries, key=lambda e: (e.offset, e.nbytes)):
        if entry.offset != end:
            raise UserError(
                f"{str(path)!r}: tensor {entry.name!r} starts at byte {entry.offset}, expected {end} "
                f"(tensors overlap or leave a gap); {_REDO}"
            )
        end += entry.nbytes
        if end > size:
            raise UserError(
                f"{str(path)!r} is truncated: tensor {entry.name!r} ends at byte {end} but the file has "
                f"{size} bytes; re-download or re-save it"
            )
    if end != size:
        raise UserError(
            f"{str(path)!r} has {size - end} bytes after its last tensor (expected size {end}, found {size}); {_REDO}"
        )


def _ints(value, length: int) -> bool:
    """A list of ints >= 0 (of `length` items when length > 0)."""
    return (isinstance(value, list) and (length == 0 or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 80 else text[:77] + "..."
