"""What an offload folder's weight files were made from (`OffloadIdentity`), and so its name.

The identity of a checkpoint is its safetensors headers (a GGUF file's metadata and tensor table)
hashed with each file's size and mtime (`checkpoint_identity`), with the storage dtype and the
compression settings; the folder of offload_dir.py is named by its digest, so a checkpoint with
other tensors gets another folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..spec.gguf import is_gguf, read_gguf_header

FOLDER_PREFIX = "weights-"
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class OffloadIdentity:
    """What an offload folder's files were made from. Build with `checkpoint_identity` or `of`."""

    source: str  # hex digest of the checkpoint files (headers, sizes, mtimes), or a generated source's description
    storage_dtype: str  # dtype of the stored bytes, e.g. "float16"
    compression: str  # canonical JSON of the compression settings; "none" when stored uncompressed

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if not isinstance(getattr(self, field.name), str) or not getattr(self, field.name):
                raise ValueError(f"OffloadIdentity.{field.name} must be a non-empty string")

    @classmethod
    def of(cls, source: str, *, storage_dtype: torch.dtype | str, compression: object = None) -> "OffloadIdentity":
        """An identity with the dtype and compression settings in canonical form. `compression`
        is opaque here: None (uncompressed), a string, a mapping or a dataclass of settings."""
        return cls(source=source, storage_dtype=str(storage_dtype).removeprefix("torch."), compression=_canonical(compression))

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()

    @property
    def folder_name(self) -> str:
        return f"{FOLDER_PREFIX}{self.digest[:32]}"


def checkpoint_identity(
    weight_files: Iterable[str | Path], *, storage_dtype: torch.dtype | str, compression: object = None
) -> OffloadIdentity:
    """The identity of a safetensors checkpoint: per file, its name, size, mtime_ns and the hash
    of its JSON header (every tensor's name, dtype, shape and offsets). Reading the headers costs
    kilobytes, not the checkpoint: a checkpoint with other tensors gets another folder even at the
    same names, sizes and mtimes. (Other values under an identical header, size and mtime_ns
    are not seen: that takes a deliberate forgery.)"""
    h = hashlib.sha256()
    for path in sorted({Path(p) for p in weight_files}, key=lambda p: p.name):
        if is_gguf(path):  # a GGUF file: its metadata and tensor table stand for its header
            st, digest = _stat(path), read_gguf_header(path).digest
        else:
            header, st = _safetensors_header(path)
            digest = hashlib.sha256(header).hexdigest()
        about = {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "header": digest}
        h.update(json.dumps(about, sort_keys=True).encode() + b"\n")
    return OffloadIdentity.of(h.hexdigest(), storage_dtype=storage_dtype, compression=compression)


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as exc:
        raise UserError(f"cannot read the checkpoint file {path} ({exc.strerror}); check it exists and is readable") from None


def _safetensors_header(path: Path) -> tuple[bytes, os.stat_result]:
    """The JSON header of a safetensors file (after its 8-byte little-endian length) and the
    file's stat, both from one open file."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= min(_MAX_HEADER_BYTES, st.st_size - 8):
                raise UserError(f"{path} is not a safetensors file (header length {length}); re-save the checkpoint")
            header = f.read(length)
    except OSError as exc:
        raise UserError(f"cannot read the checkpoint file {path} ({exc.strerror}); check it exists and is readable") from None
    return header, st


def _canonical(compression: object) -> str:
    if compression is None:
        return "none"
    if isinstance(compression, str):
        return compression
    if dataclasses.is_dataclass(compression) and not isinstance(compression, type):
        compression = dataclasses.asdict(compression)
    if isinstance(compression, Mapping):
        return json.dumps(dict(compression), sort_keys=True, separators=(",", ":"), default=str)
    raise TypeError(f"compression settings must be None, a string, a mapping or a dataclass, not {type(compression).__name__}")
