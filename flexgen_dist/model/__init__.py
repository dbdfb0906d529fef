"""Model math per family, behind one interface: `units(spec)` and `make_math(spec, device)`."""

from __future__ import annotations

import torch

from ..planning.spec import ModelSpec
from . import llama, opt
from .layers import attention
from .units import Step, Unit, WeightSpec

_FAMILIES = {"llama": (llama.units, llama.LlamaMath), "opt": (opt.units, opt.OptMath)}


def model_units(spec: ModelSpec) -> list[Unit]:
    return _FAMILIES[spec.family][0](spec)


def make_math(spec: ModelSpec, device: torch.device):
    return _FAMILIES[spec.family][1](spec, device)


def prefill_layer(math, w, x: torch.Tensor, step: Step):
    """One decoder layer over a whole prompt (no past): x (B, T, C) -> x, k, v (B, nkv, T, hd).

    Decode steps attend over KV buffers in place instead (engine._decode_layer)."""
    q, k, v = math.qkv(w, x, step)
    a = attention(q, k, v, step.mask, math.scale)  # (B, T, nh * hd)
    return math.finish(w, x, a), k, v


__all__ = ["Step", "Unit", "WeightSpec", "prefill_layer", "make_math", "model_units"]
