"""Where weights come from: a Hugging Face safetensors checkpoint, a GGUF file (its source in
gguf.py, loaded only for one), or seeded random values.

Each hands out one tensor at a time (`get`), so the whole model is never in RAM at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import BinaryIO, Protocol, Sequence

import torch

from ..errors import UserError, file_error
from ..spec.layout import Unit, WeightSpec, model_units
from ..spec.model import ModelSpec
from .safetensors_header import TensorEntry
from .validate import check_finite, match_units, resolve_key, scan_checkpoint, unstack_experts

log = logging.getLogger(__name__)

# The floating-point safetensors dtypes validate.py lets through, as torch dtypes.
SAMPLE_BYTES = 4096  # read of each tensor, three times, to tell checkpoints apart (content_digest)
TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class WeightSource(Protocol):
    """Where weights come from, one tensor at a time."""

    def fingerprint(self) -> str:
        """Changes whenever the weights change (names the offload folder's files)."""

    def content_digest(self) -> str:
        """Equal for equal weights on any machine (the ranks of a pipeline compare it)."""

    def get(self, ws: WeightSpec) -> torch.Tensor:
        """The tensor of `ws`, on the CPU, in the source's dtype."""

    def close(self) -> None:
        """Drop what was opened to read (open files)."""


class CheckpointSource:
    """Tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`.

    Built only from a checkpoint that passed `validate.py`: every file's header is checked and
    the tensors are held to `units` (the whole model's; default: those of the folder's own
    config.json) before anything is read, so a damaged file or a config that does not fit the
    weights is one line up front. Each tensor is then read with plain file reads (an I/O error is
    an exception, where a memory map would die of SIGBUS) and checked for NaN / Inf. Not for
    concurrent `get` calls: the weight store reads one tensor at a time.
    """

    def __init__(self, model_dir: str | Path, units: Sequence[Unit] | None = None):
        self.model_dir = Path(model_dir)
        if units is None:
            units = model_units(ModelSpec.from_dir(self.model_dir))
        tensors = unstack_experts(scan_checkpoint(self.model_dir), units, self.model_dir)
        match_units(tensors, units, self.model_dir)
        self._tensors = tensors
        self._files: dict[Path, BinaryIO] = {}

    def fingerprint(self) -> str:
        """Changes when any weight file changes (name, size, modification time)."""
        h = hashlib.sha256()
        for path in sorted({entry.path for entry in self._tensors.values()}):
            try:
                st = os.stat(path)
            except OSError as exc:
                raise file_error(exc, path, "stat") from None
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def content_digest(self) -> str:
        """The same for the same weights wherever the files lie (another node's copy, another
        modification time): each tensor's name, dtype and shape and a sample of its bytes (its
        first, middle and last SAMPLE_BYTES), so a checkpoint fine-tuned from the same base differs."""
        h = hashlib.sha256()
        for name in sorted(self._tensors):
            entry = self._tensors[name]
            h.update(f"{name}:{entry.dtype}:{entry.shape}\n".encode())
            for at in sorted({0, max(0, entry.nbytes // 2 - SAMPLE_BYTES // 2), max(0, entry.nbytes - SAMPLE_BYTES)}):
                h.update(self._read_bytes(entry, at, min(SAMPLE_BYTES, entry.nbytes - at)))
        return h.hexdigest()

    def _read_bytes(self, entry: TensorEntry, at: int, count: int) -> bytes:
        try:
            f = self._files.get(entry.path)
            if f is None:
                f = self._files[entry.path] = open(entry.path, "rb", buffering=0)
            return os.pread(f.fileno(), count, entry.offset + at)
        except OSError as exc:
            raise file_error(exc, entry.path, "read") from None

    def close(self) -> None:
        """Close the weight files (after placement, they are not read again)."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def weight_files(self) -> set[Path]:
        """The safetensors files the weights come from (their headers identify the checkpoint)."""
        return {entry.path for entry in self._tensors.values()}

    def get(self, ws: WeightSpec) -> torch.Tensor:
        name = resolve_key(ws.key, self._tensors)
        if name is None:
            raise UserError(f"checkpoint {str(self.model_dir)!r} has no tensor {ws.key!r}; is it complete and of this architecture?")
        entry = self._tensors[name]
        if entry.shape != ws.shape:
            raise UserError(
                f"checkpoint tensor {name!r} has shape {entry.shape}, config.json implies {ws.shape}; "
                "the config and the weights do not belong together"
            )
        tensor = self._read(entry)
        check_finite(name, tensor, repr(str(entry.path)))
        return tensor

    def _read(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor's bytes, read straight into a new CPU tensor (one copy from the page cache)."""
        tensor = torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype])
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        try:
            f = self._files.get(entry.path)
            if f is None:
                f = self._files[entry.path] = open(entry.path, "rb", buffering=0)
            f.seek(entry.offset)
            done = 0
            while done < entry.nbytes:  # one read returns at most ~2 GiB on Linux
                count = f.readinto(view[done:])
                if not count:
                    raise UserError(
                        f"{str(entry.path)!r} ended inside tensor {entry.name!r}: the file was truncated after it "
                        "was checked; re-download or re-save it"
                    )
                done += count
        except OSError as exc:
            raise file_error(exc, entry.path, "read") from None
        return tensor


class RandomSource:
    """Seeded random weights for benchmarks: each tensor depends only on (seed, key)."""

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed = seed
        self.std = std

    def fingerprint(self) -> str:
        return f"random-seed{self.seed}-std{self.std}"

    def content_digest(self) -> str:
        return self.fingerprint()

    def close(self) -> None:
        pass

    def get(self, ws: WeightSpec) -> torch.Tensor:
        if ws.init == "ones":
            return torch.ones(ws.shape)
        if ws.init == "zeros":
            return torch.zeros(ws.shape)
        digest = hashlib.sha256(f"{self.seed}:{ws.key}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        return torch.randn(ws.shape, generator=gen) * self.std
