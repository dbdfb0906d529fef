"""Model math per family, behind one interface: `units(spec)` and `make_math(spec, device)`."""

from __future__ import annotations

import torch

from ..planning.spec import ModelSpec
from . import llama, opt
from .units import Step, Unit, WeightSpec

_FAMILIES = {"llama": (llama.units, llama.LlamaMath), "opt": (opt.units, opt.OptMath)}


def model_units(spec: ModelSpec) -> list[Unit]:
    return _FAMILIES[spec.family][0](spec)


def make_math(spec: ModelSpec, device: torch.device):
    return _FAMILIES[spec.family][1](spec, device)


__all__ = ["Step", "Unit", "WeightSpec", "model_units", "make_math"]
