"""Where one block's KV caches and activations live while it is open, and what a compute borrows.

`BlockIO` (block_io.py) makes these when a block opens and `BlockState` (blocks.py) holds them:
kept apart from both so that neither imports the other for their types.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import KVView
from ..planning.placement import CachePlace, Tier
from ..storage.slots import Slot
from ..storage.tiers import DiskTensor, TierTensor, to_compute


@dataclass
class KVCache:
    """Keys and values of one (layer, batch) of one block, each (S, B, nkv, hd), on their tiers."""

    k: TierTensor
    v: TierTensor
    place: CachePlace
    written: object = None  # an event after the last store (a device-to-host copy may still run)


@dataclass(frozen=True)
class KVLease:
    """The KV view handed to one compute. From scratch: the pool slot behind it and its keys and
    values buffers (which `store_cache` writes to the tier); in place: none of these."""

    view: KVView
    scratch: Slot | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


class ActivationHome:
    """Where one GPU batch's hidden state waits between two layers: kept as it is (the compute
    device's memory), moved to host memory (cpu tier beside a GPU), or written to a file."""

    def __init__(self, tier: Tier, device: torch.device, dtype: torch.dtype, file: DiskTensor | None = None):
        self.tier, self.device, self.dtype, self.file = tier, device, dtype, file
        self._held: torch.Tensor | None = None
        self._length = 0

    def store(self, x: torch.Tensor) -> None:  # x: (B, T, C)
        if self.file is not None:
            self.file.write(slice(0, x.shape[1]), x.transpose(0, 1))  # (T, B, C)
            self._length = x.shape[1]
        elif self.tier is Tier.CPU and self.device.type != "cpu":
            self._held = x.to("cpu", non_blocking=True)
        else:
            self._held = x

    def load(self) -> torch.Tensor:
        if self.file is not None:
            return to_compute(self.file, slice(0, self._length), self.device, self.dtype).transpose(0, 1)
        x, self._held = self._held, None
        return x.to(self.device, non_blocking=True)
