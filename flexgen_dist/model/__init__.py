"""Model math per family behind one interface (`LayerMath`), and one decoder layer over KV buffers."""

from __future__ import annotations

import importlib

import torch

from ..spec.families import MATH_CLASSES
from ..spec.model import ModelSpec
from .decoder import KVView, LayerMath, Step, decoder_layer, mixed_decoder_layer


def make_math(spec: ModelSpec, device: torch.device) -> LayerMath:
    """The layer math of spec's family, its module imported here, the one place that does."""
    module_name, class_name = MATH_CLASSES[spec.family]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)(spec, device)


__all__ = ["KVView", "LayerMath", "Step", "decoder_layer", "make_math", "mixed_decoder_layer"]
