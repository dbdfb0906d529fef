"""Where weights come from: a Hugging Face safetensors checkpoint, or seeded random values.

Both hand out one tensor at a time (`get`), so the whole model is never in RAM at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from ..errors import UserError
from ..planning.layout import WeightSpec


class WeightSource(Protocol):
    """Where weights come from, one tensor at a time."""

    def fingerprint(self) -> str:
        """Changes whenever the weights change (names the offload folder's files)."""

    def get(self, ws: WeightSpec) -> torch.Tensor:
        """The tensor of `ws`, on the CPU, in the source's dtype."""

    def close(self) -> None:
        """Drop what was opened to read (memory maps)."""


class CheckpointSource:
    """Tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise UserError(f"{index} is not a valid safetensors index ({exc}); re-save the checkpoint") from None
            self._file_of = {key: self.model_dir / name for key, name in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self._file_of = {key: single for key in f.keys()}
        else:
            raise UserError(
                f"no weights in {str(self.model_dir)!r}: expected model.safetensors or "
                "model.safetensors.index.json (convert .bin checkpoints with save_pretrained(safe_serialization=True))"
            )
        self._handles: dict[Path, object] = {}

    def fingerprint(self) -> str:
        """Changes when any weight file changes (name, size, modification time)."""
        h = hashlib.sha256()
        for path in sorted(set(self._file_of.values())):
            st = os.stat(path)
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def close(self) -> None:
        """Drop the memory maps of the weight files (after placement, they are not read again)."""
        self._handles.clear()

    def weight_files(self) -> set[Path]:
        """The safetensors files the weights come from (their headers identify the checkpoint)."""
        return set(self._file_of.values())

    def _resolve(self, key: str) -> str:
        # Some checkpoints were saved from the base model, without the leading "model." prefix.
        for candidate in (key, key.removeprefix("model.")):
            if candidate in self._file_of:
                return candidate
        raise UserError(f"checkpoint {str(self.model_dir)!r} has no tensor {key!r}; is it complete and of this architecture?")

    def get(self, ws: WeightSpec) -> torch.Tensor:
        key = self._resolve(ws.key)
        path = self._file_of[key]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        tensor = self._handles[path].get_tensor(key)
        if tuple(tensor.shape) != ws.shape:
            raise UserError(
                f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, config.json implies {ws.shape}; "
                "the config and the weights do not belong together"
            )
        return tensor


class RandomSource:
    """Seeded random weights for benchmarks: each tensor depends only on (seed, key)."""

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed = seed
        self.std = std

    def fingerprint(self) -> str:
        return f"random-seed{self.seed}-std{self.std}"

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
