"""Model math per family behind one interface (`LayerMath`), and one decoder layer over KV buffers."""

from __future__ import annotations

import torch

from ..spec.model import ModelSpec
from . import gemma3, llama, moe, opt, phi3, qwen3
from .decoder import KVView, LayerMath, Step, decoder_layer, mixed_decoder_layer

_FAMILIES = {
    "llama": llama.LlamaMath,
    "qwen3": qwen3.Qwen3Math,
    "phi3": phi3.Phi3Math,
    "opt": opt.OptMath,
    "mixtral": moe.MixtralMath,
    "qwen3_moe": moe.Qwen3MoeMath,
    "gemma3": gemma3.Gemma3Math,
}


def make_math(spec: ModelSpec, device: torch.device) -> LayerMath:
    return _FAMILIES[spec.family](spec, device)


__all__ = ["KVView", "LayerMath", "Step", "decoder_layer", "make_math", "mixed_decoder_layer"]
