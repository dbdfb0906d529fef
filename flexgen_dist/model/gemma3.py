"""Gemma 3 (transformers' Gemma3ForCausalLM): the Qwen3 layer (per-head q/k norms before RoPE)
with Gemma's RMSNorm (fp32, times 1 + weight), a norm after attention and around the MLP too,
a GELU (tanh approximation) gate, embeddings scaled by sqrt(hidden_size), a softmax scale of
query_pre_attn_scalar ** -0.5 and the final logits optionally softcapped.

Local layers (ModelSpec.local_layers) attend within a window (Step.local_mask) and rotate with a
rope of their own (rope_parameters["sliding_attention"]); the global ones with the full
attention's rope (Gemma 3 4B: linear scaling). `at(layer)` gives each decoder layer its math."""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F

from ..spec.model import ModelSpec
from .decoder import Step
from .layers import embedding, gemma_rms_norm, linear, rope_inv_freq
from .llama import LlamaMath


class Gemma3Math(LlamaMath):
    def __init__(self, spec: ModelSpec, device: torch.device):
        super().__init__(spec, device)  # self.inv_freq: the global layers' rope
        self.scale = spec.attention_scale
        local = copy.copy(self)  # the same math with the local layers' rope and window
        local.local = True
        local.inv_freq = rope_inv_freq(dataclasses.replace(
            spec, rope_theta=spec.local_rope_theta, rope_scaling=spec.local_rope_scaling)).to(device)
        self.layers = local.layers = tuple(local if i in spec.local_layers else self for i in range(spec.num_layers))

    def at(self, layer: int) -> "Gemma3Math":
        return self.layers[layer]

    def embed(self, w, input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        x = embedding(input_ids, w["embed_tokens.weight"])  # (B, T, C)
        # transformers keeps sqrt(C) as an fp32 tensor and rounds it to the weights' dtype
        scale = torch.tensor(self.spec.hidden_size**0.5, dtype=torch.float32).to(x.dtype).item()
        return x * scale

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return gemma_rms_norm(x, weight, self.spec.norm_eps)

    def norm_qk(self, w, q: torch.Tensor, k: torch.Tensor):
        """q (B, T, nh, hd), k (B, T, nkv, hd): each head normed over hd."""
        return self.norm(q, w["self_attn.q_norm.weight"]), self.norm(k, w["self_attn.k_norm.weight"])

    def finish(self, w, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x (B, T, C), a (B, T, nh * hd) -> x + norm(attention), then + norm(mlp(norm(x)))."""
        # the projection normed at once: nothing of (B, T, C) more than Llama's layer stays alive over the MLP
        x = x + self.norm(linear(a, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias")),
                          w["post_attention_layernorm.weight"])
        h = self.norm(x, w["pre_feedforward_layernorm.weight"])
        return x + self.norm(self.mlp(w, h), w["post_feedforward_layernorm.weight"])

    def mlp(self, w, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(w, h)  # (B, T, I) each
        return linear(F.gelu(gate, approximate="tanh") * up, w["mlp.down_proj.weight"])

    def head(self, w, x: torch.Tensor, step: Step) -> torch.Tensor:
        out = super().head(w, x, step)  # fp32 (B, T, V), a tensor of its own
        cap = self.spec.final_logit_softcapping
        if cap:
            out.div_(cap).tanh_().mul_(cap)  # in place: no second copy of the logits
        return out
