"""ModelSpec: the shape of a checkpoint, read from its Hugging Face `config.json` (no torch).

One table row per supported `model_type` instead of if/elif chains spread over the code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

# model_type -> family: how the checkpoint is laid out (planning/layout.py) and computed (model/)
SUPPORTED = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "opt": "opt",
}


@dataclass(frozen=True)
class ModelSpec:
    model_type: str  # as in config.json: llama, mistral, qwen2, opt
    family: str  # "llama" (RMSNorm, RoPE, SwiGLU) or "opt" (LayerNorm, learned positions, ReLU)
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v (and for OPT, every linear) have a bias
    o_bias: bool
    mlp_bias: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    bos_token_id: int | None
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    # OPT only
    word_embed_proj_dim: int = 0
    do_layer_norm_before: bool = True
    position_offset: int = 0
    activation: str = "silu"
    dtype: str = "float32"  # the checkpoint's dtype
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelSpec":
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise UserError(f"model folder {str(model_dir)!r} does not exist; pass a local Hugging Face model folder")
        if not path.is_file():
            raise UserError(f"{str(path)!r} is missing: a model folder needs the config.json of a Hugging Face checkpoint")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{str(path)!r} is not valid JSON ({exc}); restore the checkpoint's config.json") from None
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config: Any) -> "ModelSpec":
        """From a config dict or a transformers `PretrainedConfig`."""
        if not isinstance(config, dict):
            config = config.to_dict()
        model_type = config.get("model_type")
        if model_type not in SUPPORTED:
            raise UserError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(SUPPORTED))}"
            )
        family = SUPPORTED[model_type]
        return _opt_spec(config) if family == "opt" else _llama_spec(config, model_type)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _eos_ids(config: dict) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _get(config: dict, key: str, where: str):
    if config.get(key) is None:
        raise UserError(f"config.json has no {key!r}, needed for a {where} model; is the checkpoint complete?")
    return config[key]


def _rope_parameters(config: dict) -> tuple[float, dict | None]:
    # transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in rope_theta/rope_scaling.
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or None
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type in (None, "default"):
        return float(theta), None
    merged = {**(scaling or {}), **params, "rope_type": rope_type}
    if rope_type not in ("linear", "llama3"):
        raise UserError(
            f"rope scaling type {rope_type!r} is not supported; supported: default, linear, llama3"
        )
    return float(theta), merged


def _llama_spec(config: dict, model_type: str) -> ModelSpec:
    hidden = int(_get(config, "hidden_size", model_type))
    heads = int(_get(config, "num_attention_heads", model_type))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    theta, scaling = _rope_parameters(config)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"hidden_act {act!r} is not supported for {model_type}; supported: silu")
    qkv_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
    o_bias = bool(config.get("attention_bias", False)) and model_type != "qwen2"
    sliding = config.get("sliding_window") if model_type in ("mistral", "qwen2") else None
    if model_type == "qwen2" and not config.get("use_sliding_window", False):
        sliding = None
    return ModelSpec(
        model_type=model_type,
        family="llama",
        num_layers=int(_get(config, "num_hidden_layers", model_type)),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_get(config, "intermediate_size", model_type)),
        vocab_size=int(_get(config, "vocab_size", model_type)),
        max_positions=int(config.get("max_position_embeddings") or 2048),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        eos_token_ids=_eos_ids(config),
        pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id"),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=int(sliding) if sliding else None,
        activation="silu",
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        raw=config,
    )


def _opt_spec(config: dict) -> ModelSpec:
    hidden = int(_get(config, "hidden_size", "opt"))
    heads = int(_get(config, "num_attention_heads", "opt"))
    act = config.get("activation_function", "relu")
    if act != "relu":
        raise UserError(f"activation_function {act!r} is not supported for opt; supported: relu")
    return ModelSpec(
        model_type="opt",
        family="opt",
        num_layers=int(_get(config, "num_hidden_layers", "opt")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(_get(config, "ffn_dim", "opt")),
        vocab_size=int(_get(config, "vocab_size", "opt")),
        max_positions=int(config.get("max_position_embeddings") or 2048),
        norm_eps=1e-5,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        attention_bias=bool(config.get("enable_bias", True)),
        o_bias=bool(config.get("enable_bias", True)),
        mlp_bias=bool(config.get("enable_bias", True)),
        eos_token_ids=_eos_ids(config),
        pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id"),
        word_embed_proj_dim=int(config.get("word_embed_proj_dim") or hidden),
        do_layer_norm_before=bool(config.get("do_layer_norm_before", True)),
        position_offset=2,
        activation="relu",
        dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        raw=config,
    )
