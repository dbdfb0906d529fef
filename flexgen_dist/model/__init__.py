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


def decoder_layer(math, w, x: torch.Tensor, step: Step, past_k, past_v):
    """One decoder layer with the past keys/values on the compute device.

    x: (B, T, C); past_k/v: (B, nkv, S_past, hd) or None. Returns x, k_new, v_new (B, nkv, T, hd)."""
    q, k, v = math.qkv(w, x, step)
    k_all = k if past_k is None else torch.cat((past_k, k), dim=2)  # (B, nkv, S, hd)
    v_all = v if past_v is None else torch.cat((past_v, v), dim=2)
    a = attention(q, k_all, v_all, step.mask, math.scale)  # (B, T, nh * hd)
    return math.finish(w, x, a), k, v


__all__ = ["Step", "Unit", "WeightSpec", "decoder_layer", "make_math", "model_units"]
