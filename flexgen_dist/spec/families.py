"""How each family's config.json is read beyond the fields every family shares (no torch).

transformers' defaults per model type, the rope settings of the Llama-like layer (and Phi-3's
partial rotation), the attention windows, Gemma 3's local and global layers with a rope each, and
the experts of the mixtures of experts (Mixtral, Qwen3-MoE); spec/model.py builds the ModelSpec.
"""

from __future__ import annotations

from ..errors import UserError
from .checks import ConfigFields, describe

# transformers' defaults where a model type's config class differs from the Llama-like reads (model.py)
# (a config.json that leaves the field out gets the value transformers would give it).
DEFAULTS = {
    "qwen3": dict(head_dim=128, max_position_embeddings=32768),
    "phi3": dict(rms_norm_eps=1e-5, max_position_embeddings=4096),
    "mixtral": dict(rms_norm_eps=1e-5, max_position_embeddings=4096 * 32, rope_theta=1e6, num_experts=8,
                    num_experts_per_tok=2),
    "qwen3_moe": dict(max_position_embeddings=32768, num_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768, intermediate_size=6144, sliding_window=4096),
    # Gemma3TextConfig gives every shape a default (Gemma 3 4B's text_config leaves the heads and
    # the vocabulary out); rope thetas in _gemma3_rope
    "gemma3_text": dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                        tie_word_embeddings=True, sliding_window=4096, query_pre_attn_scalar=256),
}


# family -> the module of flexgen_dist.model and the class that compute it. model/__init__.py
# imports a family's module only when a model of that family is built: a Llama run loads no
# Gemma 3, OPT or mixture-of-experts code.
MATH_CLASSES = {
    "llama": ("llama", "LlamaMath"),
    "qwen3": ("qwen3", "Qwen3Math"),
    "phi3": ("phi3", "Phi3Math"),
    "opt": ("opt", "OptMath"),
    "mixtral": ("moe", "MixtralMath"),
    "qwen3_moe": ("moe", "Qwen3MoeMath"),
    "gemma3": ("gemma3", "Gemma3Math"),
}


ROPE_TYPES = ("default", "linear", "llama3")  # what model/layers.py rope_inv_freq computes


def _rope_type(rope: dict) -> str:
    return rope.get("rope_type") or rope.get("type") or "default"


def rope_parameters(f: ConfigFields) -> tuple[float, dict | None]:
    # transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in rope_theta/rope_scaling.
    # transformers 5 lets a `rope_scaling` replace `rope_parameters` whole (its rope_theta too), so a
    # config holding both, different, is ambiguous: refused rather than guessed.
    given = {key: value for key in ("rope_parameters", "rope_scaling") if (value := f.object(key))}
    # transformers' Phi-3 takes the default rope or longrope (su, yarn), which is not implemented
    supported = ("default",) if f.model_type == "phi3" else ROPE_TYPES
    phi3 = " for phi3 (the 4k-context Phi-3 checkpoints have no rope scaling)" if f.model_type == "phi3" else ""
    for key, value in given.items():
        rope_type = _rope_type(value)
        if not isinstance(rope_type, str):
            raise UserError(f"{f.where}: {key!r} has rope_type {describe(rope_type)}, expected a string such as "
                            f"\"linear\"; correct it in config.json or restore the checkpoint's config.json")
        if rope_type not in supported:
            raise UserError(
                f"{f.where}: {key!r} has rope scaling type {rope_type!r}, which is not implemented here "
                f"(positions would be encoded wrongly); supported: {', '.join(supported)}{phi3}: use a checkpoint "
                "with one of these"
            )
    if len(given) == 2:
        params, scaling = ({k: v for k, v in d.items() if k != "type"} | {"rope_type": _rope_type(d)}
                           for d in given.values())
        if params != scaling:
            raise UserError(
                f"{f.where} has both 'rope_parameters' {describe(given['rope_parameters'])} and 'rope_scaling' "
                f"{describe(given['rope_scaling'])}, which differ; keep the one the checkpoint was trained with "
                "and delete the other"
            )
    rope = ConfigFields({k: v for d in given.values() for k, v in d.items()},
                        f"{f.where} ({' / '.join(given) or 'rope_parameters'})", f.model_type)
    theta = rope.number("rope_theta") or f.number("rope_theta", DEFAULTS.get(f.model_type, {}).get("rope_theta", 10000.0))
    rope_type = _rope_type(rope.config)
    if rope_type == "default":
        return theta, None
    merged = {**rope.config, "rope_type": rope_type, "factor": rope.number("factor", required=True)}
    if rope_type == "llama3":
        low = merged["low_freq_factor"] = rope.number("low_freq_factor", required=True)
        high = merged["high_freq_factor"] = rope.number("high_freq_factor", required=True)
        merged["original_max_position_embeddings"] = rope.integer("original_max_position_embeddings", required=True)
        rope.require(high > low, f"high_freq_factor {high} must be greater than low_freq_factor {low}")
    return theta, merged



_LAYER_KINDS = ("sliding_attention", "full_attention")  # Gemma 3's local and global layers
GEMMA3_ROPE_TYPES = ("default", "linear")


def gemma3_fields(f: ConfigFields) -> dict:
    """Gemma 3's settings, as transformers 5.24's Gemma3TextConfig reads them: which layers are
    local (layer_types, else every sliding_window_pattern-th layer is global), their window,
    each kind's rope (_gemma3_rope), the softmax scale query_pre_attn_scalar ** -0.5 and the
    final logits' softcap. What its Gemma3ForCausalLM computes otherwise is refused."""
    defaults = DEFAULTS["gemma3_text"]
    act = f.text("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise f.bad("hidden_activation", act, '"gelu_pytorch_tanh" (the only activation implemented for gemma3_text, '
                                              "and every Gemma 3 checkpoint's)")
    if f.config.get("attn_logit_softcapping") is not None:
        raise UserError(f"{f.where}: 'attn_logit_softcapping' is {describe(f.config['attn_logit_softcapping'])}: "
                        "softcapped attention scores are not implemented (Gemma 3 checkpoints have null); "
                        "use a checkpoint without it")
    if f.flag("use_bidirectional_attention", False):
        raise UserError(f"{f.where}: 'use_bidirectional_attention' is true: bidirectional attention (an "
                        "embedding model's) is not supported for generation; use a causal Gemma 3 checkpoint")
    num_layers = f.integer("num_hidden_layers", defaults["num_hidden_layers"])
    kinds = f.config.get("layer_types")
    if kinds is None:
        pattern = f.integer("sliding_window_pattern", 6)
        kinds = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
    if not isinstance(kinds, list) or len(kinds) != num_layers or any(k not in _LAYER_KINDS for k in kinds):
        raise f.bad("layer_types", kinds, f"a list of {num_layers} entries (num_hidden_layers), each "
                                           f"{' or '.join(repr(k) for k in _LAYER_KINDS)}")
    local = tuple(i for i, kind in enumerate(kinds) if kind == "sliding_attention")
    if local and "sliding_window" in f.config and f.config["sliding_window"] is None:
        raise f.bad("sliding_window", None, f"the window of the {len(local)} sliding_attention layers (a positive "
                                            "integer)")
    window = f.integer("sliding_window", defaults["sliding_window"]) if local else None
    theta, scaling, local_theta, local_scaling = _gemma3_rope(f)
    return dict(
        rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta, local_rope_scaling=local_scaling,
        local_window=window, local_layers=local,
        attention_scale=f.number("query_pre_attn_scalar", defaults["query_pre_attn_scalar"]) ** -0.5,
        final_logit_softcapping=f.number("final_logit_softcapping", None),
    )


def _gemma3_rope(f: ConfigFields) -> tuple[float, dict | None, float, dict | None]:
    """(theta, scaling) of the global layers, then of the local ones, as Gemma3TextConfig's
    convert_rope_params_to_dict makes them: rope_parameters {"sliding_attention": {...},
    "full_attention": {...}} (transformers 5), a rope_scaling merged into the full layers' (4.x,
    Gemma 3 4B: linear, factor 8), thetas missing there from rope_theta (global, default 1e6) and
    rope_local_base_freq (local, default 1e4)."""
    params = f.object("rope_parameters")
    if params is not None and (set(params) - set(_LAYER_KINDS)
                               or any(v is not None and not isinstance(v, dict) for v in params.values())):
        raise f.bad("rope_parameters", params, "an object of the two layer kinds' rope settings, "
                                               '{"sliding_attention": {...}, "full_attention": {...}}')
    given = {kind: dict((params or {}).get(kind) or {"rope_type": "default"}) for kind in _LAYER_KINDS}
    scaling = f.object("rope_scaling")
    if scaling is not None:
        given["full_attention"].update(scaling)
    out = []
    for kind, key, default in (("full_attention", "rope_theta", 1e6),
                               ("sliding_attention", "rope_local_base_freq", 1e4)):
        merged = " with rope_scaling" if scaling is not None and kind == "full_attention" else ""
        rope = ConfigFields(given[kind], f"{f.where} (rope_parameters[{kind!r}]{merged})", f.model_type, f.fix)
        named = {k: rope.config[k] for k in ("rope_type", "type") if k in rope.config}
        if len(set(map(str, named.values()))) > 1:
            raise UserError(
                f"{rope.where}: \"type\" is {describe(named['type'])} but \"rope_type\" is "
                f"{describe(named['rope_type'])}, and transformers' Gemma 3 computes the latter (the default rope when "
                "a rope_scaling gives only \"type\", ignoring its scaling); write the scaling the checkpoint was "
                "trained with as \"rope_type\" in config.json"
            )
        rope_type = _rope_type(rope.config)
        if rope_type not in GEMMA3_ROPE_TYPES:
            raise UserError(f"{rope.where}: rope scaling type {describe(rope_type)} is not implemented for gemma3_text "
                            f"(positions would be encoded wrongly); supported: {', '.join(GEMMA3_ROPE_TYPES)}")
        theta = rope.number("rope_theta") or f.number(key, default)
        out += [theta, {"rope_type": "linear", "factor": rope.number("factor", required=True)}
                if rope_type == "linear" else None]
    return tuple(out)


# Settings of other mixtures of experts that the transformers classes of mixtral and qwen3_moe do
# not have: a config.json holding one (other than the value meaning "none") describes a model these
# layers would compute otherwise than it was trained. key -> (values that mean none, what it is)
_MOE_UNSUPPORTED = {
    "shared_expert_intermediate_size": ((0,), "a shared expert (as Qwen2-MoE's)"),
    "n_shared_experts": ((0,), "shared experts (as DeepSeek's)"),
    "num_shared_experts": ((0,), "shared experts"),
    "scoring_func": (("softmax",), "a router scoring function"),
    "topk_method": (("greedy",), "a top-k routing method"),
    "routed_scaling_factor": ((1, 1.0), "a scale on the routing weights"),
    "n_group": ((1,), "grouped routing"),
    "topk_group": ((1,), "grouped routing"),
    "moe_layer_freq": ((1,), "a sparse-layer frequency (decoder_sparse_step here)"),
}


def moe_fields(f: ConfigFields) -> dict:
    """The experts of Mixtral (every layer sparse, the top-k weights always renormalised) and
    Qwen3-MoE (layers in mlp_only_layers, or whose index + 1 decoder_sparse_step does not divide,
    are dense; renormalised when norm_topk_prob), as transformers reads them."""
    model_type, defaults = f.model_type, DEFAULTS[f.model_type]
    for key, (none, what) in _MOE_UNSUPPORTED.items():
        value = f.config.get(key)
        if value is not None and value not in none:
            raise UserError(
                f"{f.where}: {key!r} is {describe(value)}: {what} is not implemented for {model_type} (nor by "
                f"transformers' {model_type} model, which would ignore it); use a checkpoint of a supported "
                "model type, or delete the key if the checkpoint was not trained with it"
            )
    num_layers = f.integer("num_hidden_layers", required=True)
    experts = _expert_count(f, minimum=0 if model_type == "qwen3_moe" else 1)
    top_k = f.integer("num_experts_per_tok", defaults["num_experts_per_tok"])
    if model_type == "mixtral":
        width = f.integer("intermediate_size", required=True)
        sparse, norm = tuple(range(num_layers)), True
    else:
        width = f.integer("moe_intermediate_size", defaults["moe_intermediate_size"])
        norm = f.flag("norm_topk_prob", False)
        step = f.integer("decoder_sparse_step", 1)
        dense = f.config.get("mlp_only_layers")
        if dense is None:
            dense = []
        if not isinstance(dense, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in dense):
            raise f.bad("mlp_only_layers", dense, "a list of decoder layer indices (integers >= 0)")
        sparse = tuple(i for i in range(num_layers) if experts and i not in dense and (i + 1) % step == 0)
    if sparse:
        f.require(top_k <= experts, f"num_experts_per_tok {top_k} is more than the {experts} experts")
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=width,
                norm_topk_prob=norm, sparse_layers=sparse)


def _expert_count(f: ConfigFields, minimum: int) -> int:
    """num_local_experts (Mixtral's name; transformers 5 saves Qwen3-MoE's under it too) or
    num_experts (Qwen3-MoE's published configs): transformers takes either."""
    given = {key: f.integer(key, None, minimum=minimum) for key in ("num_local_experts", "num_experts")
             if f.config.get(key) is not None}
    if len(set(given.values())) > 1:
        raise UserError(
            f"{f.where} has both 'num_local_experts' {given['num_local_experts']} and 'num_experts' "
            f"{given['num_experts']}, which differ (transformers reads them as one setting); keep the checkpoint's "
            "number of experts in one of them and delete the other"
        )
    return next(iter(given.values()), DEFAULTS[f.model_type]["num_experts"])


def sliding_window(f: ConfigFields) -> int | None:
    """The attention window of every layer, or None. The engine masks all layers alike, so a
    Qwen3 config whose layer_types mix sliding and full layers is refused."""
    model_type = f.model_type
    if model_type in ("mistral", "phi3", "mixtral"):  # one window for every layer when set
        return f.integer("sliding_window", None)
    if model_type == "qwen3_moe":  # every layer slides when use_sliding_window is set
        window = f.integer("sliding_window", DEFAULTS[model_type]["sliding_window"])
        return window if f.flag("use_sliding_window", False) else None
    if model_type not in ("qwen2", "qwen3"):
        return None
    window = f.integer("sliding_window", None)
    if not f.flag("use_sliding_window", False) or window is None:
        return None
    if model_type == "qwen2":
        return window
    # Qwen3, as its transformers config: layer_types, else layers from max_window_layers on slide.
    num_layers = f.integer("num_hidden_layers", required=True)
    kinds = f.config.get("layer_types")
    if kinds is None:
        first = f.integer("max_window_layers", 28, minimum=0)
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    allowed = ("full_attention", "sliding_attention")
    if not isinstance(kinds, list) or len(kinds) != num_layers or any(k not in allowed for k in kinds):
        raise f.bad("layer_types", kinds, f"a list of {num_layers} entries (num_hidden_layers), each "
                                           f"{' or '.join(repr(k) for k in allowed)}")
    if len(set(kinds)) > 1:
        raise UserError(
            f"{f.where}: use_sliding_window with layers of both kinds (layer_types / max_window_layers: "
            f"{kinds.count('sliding_attention')} sliding, {kinds.count('full_attention')} full) is not "
            "supported (every layer here attends alike); set use_sliding_window to false if every prompt "
            "with its output fits in sliding_window tokens, where the two kinds attend alike"
        )
    return window if kinds[0] == "sliding_attention" else None


def partial_rotary_factor(f: ConfigFields, head_dim: int) -> float:
    """Phi-3's share of each head that RoPE rotates: in the rope settings (transformers 5, where
    they win; a rope_scaling replaces rope_parameters) or at the top level (4.x)."""
    rope = f.object("rope_scaling") or f.object("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", f.config.get("partial_rotary_factor"))
    if factor is None:
        return 1.0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise f.bad("partial_rotary_factor", factor, "a number in (0, 1]")
    rotary = int(head_dim * factor)
    f.require(rotary >= 2 and rotary % 2 == 0, f"partial_rotary_factor {factor} rotates {rotary} of the head's "
              f"{head_dim} dims; rotary embeddings need an even number, at least 2")
    return float(factor)

