"""OPT: learned positions (offset 2), LayerNorm, ReLU, biases; also the opt-350m shape
(post-LayerNorm, `word_embed_proj_dim != hidden_size` with project_in/project_out)."""

from __future__ import annotations

import torch

from ..spec.model import ModelSpec
from .layers import embedding, layer_norm, linear, logits
from .decoder import Step


class OptMath:
    local = False  # every layer attends over Step.mask

    def __init__(self, spec: ModelSpec, device: torch.device):
        self.spec = spec
        self.scale = spec.head_dim**-0.5

    def at(self, layer: int):
        return self  # every layer computes alike

    def embed(self, w, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = embedding(input_ids, w["embed_tokens.weight"])  # (B, T, E)
        if "project_in.weight" in w:
            x = linear(x, w["project_in.weight"])  # (B, T, C)
        return x + embedding(step.positions + self.spec.position_offset, w["embed_positions.weight"])

    def qkv(self, w, x: torch.Tensor, step: Step):
        """x: (B, T, C) -> q, k, v, each (B, nh, T, hd)."""
        s = self.spec
        B, T, C = x.shape
        nh, hd = s.num_heads, s.head_dim
        h = layer_norm(x, *self._norm(w, "self_attn_layer_norm")) if s.do_layer_norm_before else x
        q = linear(h, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
        k = linear(h, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
        v = linear(h, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
        q = q.reshape(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.reshape(B, T, nh, hd).transpose(1, 2)
        v = v.reshape(B, T, nh, hd).transpose(1, 2)
        return q, k, v

    def finish(self, w, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention: x (B, T, C), a (B, T, C) -> x."""
        pre = self.spec.do_layer_norm_before
        x = x + linear(a, w["self_attn.out_proj.weight"], w.get("self_attn.out_proj.bias"))
        if not pre:
            x = layer_norm(x, *self._norm(w, "self_attn_layer_norm"))
        h = layer_norm(x, *self._norm(w, "final_layer_norm")) if pre else x
        h = linear(h, w["fc1.weight"], w.get("fc1.bias")).relu_()
        x = x + linear(h, w["fc2.weight"], w.get("fc2.bias"))
        if not pre:
            x = layer_norm(x, *self._norm(w, "final_layer_norm"))
        return x

    def _norm(self, w, name: str):
        return w[name + ".weight"], w[name + ".bias"], self.spec.norm_eps

    def head(self, w, x: torch.Tensor, step: Step) -> torch.Tensor:
        if step.last_only:
            x = x[:, -1:]
        if "final_layer_norm.weight" in w:
            x = layer_norm(x, w["final_layer_norm.weight"], w["final_layer_norm.bias"], self.spec.norm_eps)
        if "project_out.weight" in w:
            x = linear(x, w["project_out.weight"])
        return logits(x, w["lm_head.weight"])  # (B, T, V)
