"""Phi-3: the Llama layer with fused projections, kept as the checkpoint stores them
(`self_attn.qkv_proj`, `mlp.gate_up_proj`) and split after the matmul, as transformers does;
RoPE on the first `partial_rotary_factor` of each head (model/layers.py)."""

from __future__ import annotations

import torch

from .layers import linear
from .llama import LlamaMath


class Phi3Math(LlamaMath):
    def project_qkv(self, w, h: torch.Tensor):
        """h (B, T, C) -> q (B, T, nh * hd), k and v (B, T, nkv * hd): slices of one fused output."""
        s = self.spec
        qkv = linear(h, w["self_attn.qkv_proj.weight"])  # (B, T, nh * hd + 2 * nkv * hd)
        return qkv.split((s.num_heads * s.head_dim, s.kv_dim, s.kv_dim), dim=-1)

    def gate_up(self, w, h: torch.Tensor):
        """h (B, T, C) -> gate, up (B, T, I) each: the two halves of one fused output."""
        return linear(h, w["mlp.gate_up_proj.weight"]).chunk(2, dim=-1)
