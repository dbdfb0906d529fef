"""What the schedule calls a layer: a unit of weights loaded and computed together.

A model is a list of units: the input embedding, one unit per decoder layer, and the head
(final norm + output projection). Each family module (llama.py, opt.py) says which checkpoint
tensors each unit needs and computes it; the engine never looks inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightSpec:
    name: str  # the key inside the unit, as the unit's compute function reads it
    key: str  # the checkpoint key (module names mirror the checkpoint, so loading is a copy)
    shape: tuple[int, ...]
    init: str = "normal"  # for random weights: "normal", "ones" or "zeros"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Unit:
    kind: str  # "embed", "block" or "head"
    layer_idx: int  # index in the schedule: 0 = embed, 1..L = decoder layers, L + 1 = head
    weights: tuple[WeightSpec, ...]

    @property
    def has_cache(self) -> bool:
        return self.kind == "block"


@dataclass
class Step:
    """What every unit of one GPU batch needs to know about the current token step."""

    positions: torch.Tensor  # (B, T) position of each query slot, counted from the first real token
    mask: torch.Tensor  # (B, 1, T, S) bool: query slot may attend key slot
    last_only: bool = True  # the head computes logits for the last slot only
