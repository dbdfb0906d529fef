"""Llama, Mistral and Qwen2: RMSNorm, RoPE (default, linear, llama3), SwiGLU, grouped-query attention.

Qwen3 (model/qwen3.py) and Phi-3 (model/phi3.py) are this layer with other projections or
norms: they override `project_qkv`, `norm_qk` or `gate_up`; the mixtures of experts
(model/moe.py: Mixtral, Qwen3-MoE) override `mlp`; Gemma 3 (model/gemma3.py) `norm` and more."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec.model import ModelSpec
from .layers import apply_rope, embedding, linear, logits, rms_norm, rope_cos_sin, rope_inv_freq
from .decoder import Step


class LlamaMath:
    local = False  # every layer attends over Step.mask

    def __init__(self, spec: ModelSpec, device: torch.device):
        self.spec = spec
        self.inv_freq = rope_inv_freq(spec).to(device)
        self.scale = spec.head_dim**-0.5

    def at(self, layer: int):
        return self  # every layer computes alike

    def embed(self, w: dict[str, torch.Tensor], input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        return embedding(input_ids, w["embed_tokens.weight"])  # (B, T, C)

    def qkv(self, w, x: torch.Tensor, step: Step):
        """x: (B, T, C) -> q (B, nh, T, hd), k and v (B, nkv, T, hd), with RoPE applied."""
        s = self.spec
        B, T, C = x.shape
        nh, nkv, hd = s.num_heads, s.num_kv_heads, s.head_dim
        h = self.norm(x, w["input_layernorm.weight"])
        q, k, v = self.project_qkv(w, h)  # (B, T, nh * hd), (B, T, nkv * hd) twice
        q, k = self.norm_qk(w, q.reshape(B, T, nh, hd), k.reshape(B, T, nkv, hd))  # (B, T, heads, hd)
        q = q.transpose(1, 2)  # (B, nh, T, hd)
        k = k.transpose(1, 2)  # (B, nkv, T, hd)
        v = v.reshape(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        cos, sin = rope_cos_sin(self.inv_freq, step.positions, x.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def project_qkv(self, w, h: torch.Tensor):
        """The normed input (B, T, C) -> q (B, T, nh * hd), k and v (B, T, nkv * hd)."""
        q = linear(h, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
        k = linear(h, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
        v = linear(h, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
        return q, k, v

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of x (..., C) with weight (C,), as transformers' LlamaRMSNorm."""
        return rms_norm(x, weight, self.spec.norm_eps)

    def norm_qk(self, w, q: torch.Tensor, k: torch.Tensor):
        """Per-head queries and keys (B, T, heads, hd) before RoPE: as they are (Qwen3 norms them)."""
        return q, k

    def finish(self, w, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention: x (B, T, C), a (B, T, nh * hd) -> x."""
        x = x + linear(a, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
        h = self.norm(x, w["post_attention_layernorm.weight"])
        return x + self.mlp(w, h)

    def mlp(self, w, h: torch.Tensor) -> torch.Tensor:
        """The normed input (B, T, C) -> the MLP's output (B, T, C): SwiGLU (model/moe.py routes
        each token to experts instead)."""
        gate, up = self.gate_up(w, h)  # (B, T, I) each
        return linear(F.silu(gate) * up, w["mlp.down_proj.weight"], w.get("mlp.down_proj.bias"))

    def gate_up(self, w, h: torch.Tensor):
        """The normed input (B, T, C) -> the MLP's gate and up projections, (B, T, I) each."""
        gate = linear(h, w["mlp.gate_proj.weight"], w.get("mlp.gate_proj.bias"))
        up = linear(h, w["mlp.up_proj.weight"], w.get("mlp.up_proj.bias"))
        return gate, up

    def head(self, w, x: torch.Tensor, step: Step) -> torch.Tensor:
        if step.last_only:
            x = x[:, -1:]
        x = self.norm(x, w["norm.weight"])
        return logits(x, w["lm_head.weight"])  # (B, T, V)
