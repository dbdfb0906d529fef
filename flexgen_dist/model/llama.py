"""Llama, Mistral and Qwen2: RMSNorm, RoPE (default, linear, llama3), SwiGLU, grouped-query attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..planning.spec import ModelSpec
from .layers import apply_rope, linear, rms_norm, rope_cos_sin, rope_inv_freq
from .units import Step, Unit, WeightSpec


def units(spec: ModelSpec) -> list[Unit]:
    C, hd, I, V = spec.hidden_size, spec.head_dim, spec.intermediate_size, spec.vocab_size
    q_dim, kv_dim = spec.num_heads * hd, spec.kv_dim
    embed = Unit("embed", 0, (WeightSpec("embed_tokens.weight", "model.embed_tokens.weight", (V, C)),))
    blocks = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        w = [WeightSpec("input_layernorm.weight", p + "input_layernorm.weight", (C,), "ones")]
        for proj, out_dim in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
            name = f"self_attn.{proj}_proj"
            w.append(WeightSpec(name + ".weight", p + name + ".weight", (out_dim, C)))
            if spec.attention_bias:
                w.append(WeightSpec(name + ".bias", p + name + ".bias", (out_dim,), "zeros"))
        w.append(WeightSpec("self_attn.o_proj.weight", p + "self_attn.o_proj.weight", (C, q_dim)))
        if spec.o_bias:
            w.append(WeightSpec("self_attn.o_proj.bias", p + "self_attn.o_proj.bias", (C,), "zeros"))
        w.append(WeightSpec("post_attention_layernorm.weight", p + "post_attention_layernorm.weight", (C,), "ones"))
        for proj, shape in (("gate", (I, C)), ("up", (I, C)), ("down", (C, I))):
            name = f"mlp.{proj}_proj"
            w.append(WeightSpec(name + ".weight", p + name + ".weight", shape))
            if spec.mlp_bias:
                w.append(WeightSpec(name + ".bias", p + name + ".bias", (shape[0],), "zeros"))
        blocks.append(Unit("block", i + 1, tuple(w)))
    head_key = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
    head = Unit(
        "head",
        spec.num_layers + 1,
        (
            WeightSpec("norm.weight", "model.norm.weight", (C,), "ones"),
            WeightSpec("lm_head.weight", head_key, (V, C)),
        ),
    )
    return [embed, *blocks, head]


class LlamaMath:
    def __init__(self, spec: ModelSpec, device: torch.device):
        self.spec = spec
        self.inv_freq = rope_inv_freq(spec).to(device)
        self.scale = spec.head_dim**-0.5

    def embed(self, w: dict[str, torch.Tensor], input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        return F.embedding(input_ids, w["embed_tokens.weight"])  # (B, T, C)

    def qkv(self, w, x: torch.Tensor, step: Step):
        """x: (B, T, C) -> q (B, nh, T, hd), k and v (B, nkv, T, hd), with RoPE applied."""
        s = self.spec
        B, T, C = x.shape
        nh, nkv, hd = s.num_heads, s.num_kv_heads, s.head_dim
        h = rms_norm(x, w["input_layernorm.weight"], s.norm_eps)
        q = linear(h, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
        k = linear(h, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
        v = linear(h, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        cos, sin = rope_cos_sin(self.inv_freq, step.positions, x.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, w, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention: x (B, T, C), a (B, T, nh * hd) -> x."""
        s = self.spec
        x = x + linear(a, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
        h = rms_norm(x, w["post_attention_layernorm.weight"], s.norm_eps)
        gate = linear(h, w["mlp.gate_proj.weight"], w.get("mlp.gate_proj.bias"))
        up = linear(h, w["mlp.up_proj.weight"], w.get("mlp.up_proj.bias"))
        return x + linear(F.silu(gate) * up, w["mlp.down_proj.weight"], w.get("mlp.down_proj.bias"))

    def head(self, w, x: torch.Tensor, step: Step) -> torch.Tensor:
        if step.last_only:
            x = x[:, -1:]
        x = rms_norm(x, w["norm.weight"], self.spec.norm_eps)
        return linear(x, w["lm_head.weight"]).float()  # (B, T, V)
