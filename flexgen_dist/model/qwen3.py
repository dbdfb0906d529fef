"""Qwen3: the Llama layer with an RMSNorm over each query and key head (q_norm, k_norm, of size
head_dim) before RoPE, and a head_dim of its own (not hidden_size / num_heads)."""

from __future__ import annotations

import torch

from .layers import rms_norm
from .llama import LlamaMath


class Qwen3Math(LlamaMath):
    def norm_qk(self, w, q: torch.Tensor, k: torch.Tensor):
        """q (B, T, nh, hd), k (B, T, nkv, hd): each head normed over hd, as transformers does."""
        eps = self.spec.norm_eps
        return rms_norm(q, w["self_attn.q_norm.weight"], eps), rms_norm(k, w["self_attn.k_norm.weight"], eps)
