"""Which checkpoint tensors make up each schedule layer, and their shapes (pure Python, no torch).

A model is a list of units, each loaded and computed as one: the input embedding (schedule layer
0), one unit per decoder layer (1..L) and the head (final norm + output projection, L + 1). The
names inside a unit mirror the checkpoint's module names, so loading is a copy; the model math
(model/llama.py, qwen3.py, phi3.py, gemma3.py, opt.py) reads them by those names (Phi-3's fused
qkv_proj and gate_up_proj too: they are split after the matmul, not in the checkpoint).

A mixture of experts (model/moe.py) has one name for its router and experts in both families,
transformers' module names (`mlp.gate.weight`, `mlp.experts.{e}.gate_proj.weight`, `up_proj`,
`down_proj`), read from the checkpoint's own keys (Mixtral's `block_sparse_moe.gate`,
`block_sparse_moe.experts.{e}.w1` / `w3` / `w2`). Each expert tensor says which expert it is
(`WeightSpec.expert`); for now a layer's experts are ordinary weights of its unit, loaded with it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .model import ModelSpec


# The head's output projection (tied or not): streamed through the weight slot a chunk of
# vocabulary rows at a time when it is larger than a decoder layer (planning/place.py).
HEAD_PROJECTION = "lm_head.weight"


class UnitKind(enum.Enum):
    EMBED = "embed"
    BLOCK = "block"  # a decoder layer: it keeps a KV cache
    HEAD = "head"


@dataclass(frozen=True)
class WeightSpec:
    name: str  # the key inside the unit, as the layer math reads it
    key: str  # the checkpoint key
    shape: tuple[int, ...]
    init: str = "normal"  # for random weights: "normal", "ones" or "zeros"
    expert: int | None = None  # the expert of a mixture of experts this tensor belongs to (None: shared)
    exact: bool = False  # kept as it is under weight compression: a router (a rounded score may change the expert)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Unit:
    kind: UnitKind
    layer_idx: int  # the schedule layer: 0 = embedding, 1..L = decoder layers, L + 1 = head
    weights: tuple[WeightSpec, ...]

    @property
    def has_cache(self) -> bool:
        return self.kind is UnitKind.BLOCK

    @property
    def numel(self) -> int:
        return sum(ws.numel for ws in self.weights)


def is_lookup(kind: UnitKind, name: str) -> bool:
    """An embedding table (tokens, OPT's learned positions): read by rows, never multiplied."""
    return kind is UnitKind.EMBED and name.startswith("embed_")


def model_units(spec: ModelSpec) -> list[Unit]:
    """Every unit of the model, in schedule order."""
    return _opt_units(spec) if spec.family == "opt" else _llama_units(spec)


def _llama_units(spec: ModelSpec) -> list[Unit]:
    C, hd, I, V = spec.hidden_size, spec.head_dim, spec.intermediate_size, spec.vocab_size
    q_dim, kv_dim = spec.num_heads * hd, spec.kv_dim
    if spec.family == "phi3":  # fused, as Phi-3 checkpoints store them (model/phi3.py splits the outputs)
        attention = (("qkv", q_dim + 2 * kv_dim),)
        mlp = (("gate_up", (2 * I, C)), ("down", (C, I)))
    else:
        attention = (("q", q_dim), ("k", kv_dim), ("v", kv_dim))
        mlp = (("gate", (I, C)), ("up", (I, C)), ("down", (C, I)))
    norm_init = "zeros" if spec.family == "gemma3" else "ones"  # Gemma's norms scale by 1 + weight
    embed = Unit(UnitKind.EMBED, 0, (WeightSpec("embed_tokens.weight", "model.embed_tokens.weight", (V, C)),))
    blocks = []
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        w = [WeightSpec("input_layernorm.weight", prefix + "input_layernorm.weight", (C,), norm_init)]
        for proj, out_dim in attention:
            name = f"self_attn.{proj}_proj"
            w.append(WeightSpec(name + ".weight", prefix + name + ".weight", (out_dim, C)))
            if spec.attention_bias:
                w.append(WeightSpec(name + ".bias", prefix + name + ".bias", (out_dim,), "zeros"))
        w.append(WeightSpec("self_attn.o_proj.weight", prefix + "self_attn.o_proj.weight", (C, q_dim)))
        if spec.o_bias:
            w.append(WeightSpec("self_attn.o_proj.bias", prefix + "self_attn.o_proj.bias", (C,), "zeros"))
        if spec.family in ("qwen3", "qwen3_moe", "gemma3"):  # RMSNorms of one head, shared by every query (key) head
            for norm in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
                w.append(WeightSpec(norm, prefix + norm, (hd,), norm_init))
        w.append(WeightSpec("post_attention_layernorm.weight", prefix + "post_attention_layernorm.weight", (C,),
                            norm_init))
        if spec.family == "gemma3":  # the MLP between norms of its own (model/gemma3.py)
            for norm in ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"):
                w.append(WeightSpec(norm, prefix + norm, (C,), norm_init))
        if layer in spec.sparse_layers:
            w.extend(_expert_weights(spec, prefix))
            blocks.append(Unit(UnitKind.BLOCK, layer + 1, tuple(w)))
            continue
        for proj, shape in mlp:
            name = f"mlp.{proj}_proj"
            w.append(WeightSpec(name + ".weight", prefix + name + ".weight", shape))
            if spec.mlp_bias:
                w.append(WeightSpec(name + ".bias", prefix + name + ".bias", (shape[0],), "zeros"))
        blocks.append(Unit(UnitKind.BLOCK, layer + 1, tuple(w)))
    head_key = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
    head = (
        WeightSpec("norm.weight", "model.norm.weight", (C,), norm_init),
        WeightSpec(HEAD_PROJECTION, head_key, (V, C)),
    )
    return [embed, *blocks, Unit(UnitKind.HEAD, spec.num_layers + 1, head)]


# Checkpoint names of an expert's projections, as the published checkpoints and transformers'
# save_pretrained write them: (gate, up, down).
_EXPERT_KEYS = {
    "mixtral": ("block_sparse_moe.", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp.", ("gate_proj", "up_proj", "down_proj")),
}


def _expert_weights(spec: ModelSpec, prefix: str) -> list[WeightSpec]:
    """A sparse layer's router (num_experts x C) and each expert's SwiGLU projections, expert by
    expert (model/moe.py reads them by these names)."""
    C, I, E = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts
    module, keys = _EXPERT_KEYS[spec.family]
    w = [WeightSpec("mlp.gate.weight", prefix + module + "gate.weight", (E, C), exact=True)]
    for e in range(E):
        for proj, key, shape in zip(("gate_proj", "up_proj", "down_proj"), keys, ((I, C), (I, C), (C, I))):
            w.append(WeightSpec(f"mlp.experts.{e}.{proj}.weight", f"{prefix}{module}experts.{e}.{key}.weight",
                                shape, expert=e))
    return w


def opt_has_projection(spec: ModelSpec) -> bool:
    """The opt-350m shape: embeddings narrower than the hidden size, with project_in / project_out."""
    return spec.word_embed_proj_dim != spec.hidden_size


def _opt_has_final_norm(spec: ModelSpec) -> bool:
    return spec.do_layer_norm_before and not spec.raw.get("_remove_final_layer_norm", False)


def _opt_units(spec: ModelSpec) -> list[Unit]:
    C, I, V, E = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.word_embed_proj_dim
    positions = spec.max_positions + spec.position_offset
    d = "model.decoder."
    embed = [
        WeightSpec("embed_tokens.weight", d + "embed_tokens.weight", (V, E)),
        WeightSpec("embed_positions.weight", d + "embed_positions.weight", (positions, C)),
    ]
    if opt_has_projection(spec):
        embed.append(WeightSpec("project_in.weight", d + "project_in.weight", (C, E)))
    blocks = []
    for layer in range(spec.num_layers):
        prefix = f"{d}layers.{layer}."
        w = []
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            w.append(WeightSpec(norm + ".weight", prefix + norm + ".weight", (C,), "ones"))
            w.append(WeightSpec(norm + ".bias", prefix + norm + ".bias", (C,), "zeros"))
        for name, shape in (
            ("self_attn.q_proj", (C, C)),
            ("self_attn.k_proj", (C, C)),
            ("self_attn.v_proj", (C, C)),
            ("self_attn.out_proj", (C, C)),
            ("fc1", (I, C)),
            ("fc2", (C, I)),
        ):
            w.append(WeightSpec(name + ".weight", prefix + name + ".weight", shape))
            if spec.attention_bias:
                w.append(WeightSpec(name + ".bias", prefix + name + ".bias", (shape[0],), "zeros"))
        blocks.append(Unit(UnitKind.BLOCK, layer + 1, tuple(w)))
    head = []
    if _opt_has_final_norm(spec):
        head.append(WeightSpec("final_layer_norm.weight", d + "final_layer_norm.weight", (C,), "ones"))
        head.append(WeightSpec("final_layer_norm.bias", d + "final_layer_norm.bias", (C,), "zeros"))
    if opt_has_projection(spec):
        head.append(WeightSpec("project_out.weight", d + "project_out.weight", (E, C)))
    head_key = d + "embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
    head.append(WeightSpec(HEAD_PROJECTION, head_key, (V, E)))
    return [Unit(UnitKind.EMBED, 0, tuple(embed)), *blocks, Unit(UnitKind.HEAD, spec.num_layers + 1, tuple(head))]
