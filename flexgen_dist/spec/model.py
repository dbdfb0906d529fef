"""ModelSpec: the shape of a checkpoint, read from its Hugging Face `config.json` (no torch).

One table row per supported `model_type` instead of if/elif chains spread over the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .checks import ConfigFields, describe, read_config_file
from .families import (DEFAULTS, gemma3_fields, moe_fields, partial_rotary_factor, rope_parameters,
                       sliding_window)

# model_type -> family: how the checkpoint is laid out (spec/layout.py) and computed (model/)
SUPPORTED = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "opt": "opt",
    # mixtures of experts: the Llama (Mixtral) or Qwen3 (Qwen3-MoE) layer with routed SwiGLU experts
    "mixtral": "mixtral",
    "qwen3_moe": "qwen3_moe",
    # the Llama layer with Gemma's norms (1 + weight, four per layer, per head on q and k), GELU,
    # scaled embeddings, and local layers of a window and rope base of their own between global ones
    "gemma3_text": "gemma3",
}
MOE_FAMILIES = ("mixtral", "qwen3_moe")


@dataclass(frozen=True)
class StoredGroups:
    """Weights a checkpoint already holds as this runtime's quantized groups (a GGUF's Q4_0, Q4_1
    and Q8_0 tensors: storage/gguf_blocks.py): they are placed compressed whatever the policy
    says, and kept as they are, never quantized a second time."""

    bits: int  # of every kept tensor's codes: 4 or 8
    group_size: int  # values sharing one scale and minimum along a row (GGUF's blocks: 32)
    keys: frozenset[str]  # checkpoint keys of the kept tensors


@dataclass(frozen=True)
class ModelSpec:
    model_type: str  # as in config.json: llama, mistral, qwen2, qwen3, phi3, opt, mixtral, qwen3_moe, gemma3_text
    # "llama" (RMSNorm, RoPE, SwiGLU), "qwen3" (llama + per-head q/k norms), "phi3" (llama with
    # fused qkv and gate_up projections), "opt" (LayerNorm, learned positions, ReLU), "mixtral"
    # (llama with routed experts), "qwen3_moe" (qwen3 with routed experts) or "gemma3" (qwen3 with
    # Gemma's norms, GELU, scaled embeddings, local and global layers: model/gemma3.py)
    family: str
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
    partial_rotary_factor: float = 1.0  # Phi-3: RoPE rotates the first rotary_dim dims of a head
    sliding_window: int | None = None  # every layer attends this many positions back at most
    # Layers with a window of their own (Gemma 3's local layers: decoder layers local_layers,
    # 0-based), the others global
    local_window: int | None = None
    local_layers: tuple[int, ...] = ()
    # The local layers' rope (Gemma 3: rope_parameters["sliding_attention"]); rope_theta and
    # rope_scaling above are the global layers'
    local_rope_theta: float | None = None
    local_rope_scaling: dict[str, Any] | None = None
    attention_scale: float | None = None  # attention's softmax scale if not head_dim ** -0.5 (Gemma 3's)
    final_logit_softcapping: float | None = None  # logits = tanh(logits / cap) * cap (Gemma 3)
    # OPT only
    word_embed_proj_dim: int = 0
    do_layer_norm_before: bool = True
    position_offset: int = 0
    activation: str = "silu"
    # Mixtures of experts (mixtral, qwen3_moe; 0 experts: dense). A sparse layer's MLP is a router
    # (a linear layer to num_experts logits) and num_experts SwiGLU MLPs of width
    # moe_intermediate_size, of which each token uses the num_experts_per_tok best; the other
    # layers have the dense MLP of width intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # the top-k routing weights renormalised to sum to 1
    sparse_layers: tuple[int, ...] = ()  # decoder layers (0-based) whose MLP is the experts
    dtype: str = "float32"  # the checkpoint's dtype
    stored_groups: StoredGroups | None = None  # weights held as quantized groups already (a GGUF's)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelSpec":
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise UserError(f"model folder {str(model_dir)!r} does not exist; pass a local Hugging Face model folder")
        if not path.is_file():
            raise UserError(f"{str(path)!r} is missing: a model folder needs the config.json of a Hugging Face checkpoint")
        return cls.from_config(read_config_file(path), where=repr(str(path)))

    @classmethod
    def from_config(cls, config: Any, where: str = "the model config") -> "ModelSpec":
        """From a config dict or a transformers `PretrainedConfig`; `where` names it in errors.
        Every field is checked (checks.py; each family's own in families.py): a wrong value is a
        one-line UserError."""
        if not isinstance(config, dict):
            config = config.to_dict()
        model_type = config.get("model_type")
        if model_type == "gemma3":
            raise UserError(
                f"{where} has model_type \"gemma3\" (Gemma3ForConditionalGeneration, text and images), which is "
                "not supported; use a text-only checkpoint (model_type \"gemma3_text\", Gemma3ForCausalLM, as "
                "google/gemma-3-1b-it), or save the language model of this one as a Gemma3ForCausalLM"
            )
        if not isinstance(model_type, str) or model_type not in SUPPORTED:
            found = "no 'model_type'" if model_type is None else f"model_type {describe(model_type)}"
            dense = sorted(t for t in SUPPORTED if SUPPORTED[t] not in (*MOE_FAMILIES, "gemma3"))
            moe = sorted(t for t in SUPPORTED if SUPPORTED[t] in MOE_FAMILIES)
            raise UserError(f"{where} has {found}, which is not supported; supported: {', '.join(dense)} and the "
                            f"mixtures of experts {', '.join(moe)}, and Gemma 3's text model gemma3_text")
        quantization = config.get("quantization_config")
        if quantization is not None:
            method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
            raise UserError(
                f"{where} has a quantization_config ({method}): quantized checkpoints are not supported; "
                "use the fp16/bf16/fp32 checkpoint"
            )
        fields = ConfigFields(config, where, model_type)
        return _opt_spec(fields) if SUPPORTED[model_type] == "opt" else _llama_spec(fields)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.sparse_layers)

    @property
    def mlp_width(self) -> int:
        """The widest MLP a layer computes on a token: the dense one's, or an expert's."""
        dense = self.intermediate_size if len(self.sparse_layers) < self.num_layers else 0
        return max(dense, self.moe_intermediate_size if self.is_moe else 0)

    @property
    def rotary_dim(self) -> int:
        """Dims of a head that RoPE rotates (transformers: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)


def _common(f: ConfigFields) -> dict:
    """Fields every family reads the same way."""
    defaults = DEFAULTS.get(f.model_type, {})
    return dict(
        model_type=f.model_type,
        num_layers=f.integer("num_hidden_layers", defaults.get("num_hidden_layers"),
                             required="num_hidden_layers" not in defaults),
        vocab_size=f.integer("vocab_size", defaults.get("vocab_size"), required="vocab_size" not in defaults),
        max_positions=f.integer("max_position_embeddings", DEFAULTS.get(f.model_type, {}).get(
            "max_position_embeddings", 2048)),
        eos_token_ids=f.token_ids("eos_token_id"),
        pad_token_id=f.token_id("pad_token_id"),
        bos_token_id=f.token_id("bos_token_id"),
        dtype=_checkpoint_dtype(f),
        raw=f.config,
    )


# The dtypes a checkpoint's weights may be stored in (model/validate.py FLOAT_DTYPES); float64 runs as float32.
CHECKPOINT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _checkpoint_dtype(f: ConfigFields) -> str:
    """`dtype` (transformers 5) or `torch_dtype` (4.x): one of CHECKPOINT_DTYPES. Anything else
    (int8, a quantized type) describes weights this runtime cannot compute with."""
    found = None
    for key in ("dtype", "torch_dtype"):
        value = f.text(key, None)
        if value is None:
            continue
        name = value.removeprefix("torch.")  # some old configs wrote "torch.float16"
        if name not in CHECKPOINT_DTYPES:
            raise f.bad(key, value, f"one of {', '.join(CHECKPOINT_DTYPES)} (the weights' floating-point type; "
                                    "quantized checkpoints are not supported)")
        found = found or name
    return found or "float32"


def _llama_spec(f: ConfigFields) -> ModelSpec:
    """Llama, Mistral, Qwen2, Qwen3, Phi-3, Mixtral, Qwen3-MoE and Gemma 3: the RMSNorm / RoPE /
    gated MLP layer."""
    model_type = f.model_type
    defaults = DEFAULTS.get(model_type, {})
    hidden = f.integer("hidden_size", defaults.get("hidden_size"), required="hidden_size" not in defaults)
    heads = f.integer("num_attention_heads", defaults.get("num_attention_heads"),
                      required="num_attention_heads" not in defaults)
    kv_heads = f.integer("num_key_value_heads", defaults.get("num_key_value_heads", heads))
    head_dim = f.integer("head_dim", defaults.get("head_dim"))
    if head_dim is None:
        f.require(hidden % heads == 0, f"num_attention_heads {heads} does not divide hidden_size {hidden} "
                  "(and there is no head_dim)")
        head_dim = hidden // heads
    f.require(heads % kv_heads == 0, f"num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}")
    f.require(head_dim % 2 == 0, f"the head dimension {head_dim} is odd; rotary embeddings need an even one")
    gemma3 = gemma3_fields(f) if model_type == "gemma3_text" else {}
    theta, scaling = (gemma3.pop("rope_theta"), gemma3.pop("rope_scaling")) if gemma3 else rope_parameters(f)
    partial = partial_rotary_factor(f, head_dim) if model_type == "phi3" else 1.0
    if not gemma3:
        act = f.text("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"{f.where}: hidden_act {act!r} is not supported for {model_type}; supported: silu")
    attention_bias = f.flag("attention_bias", False)
    if model_type == "qwen2":  # q/k/v biases always, o_proj none
        attention_bias, o_bias = True, False
    elif model_type in ("phi3", "mixtral"):  # transformers' have no biases, whatever the config says
        attention_bias = o_bias = False
    else:
        o_bias = attention_bias
    return ModelSpec(
        **_common(f),
        family=SUPPORTED[model_type],
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=f.integer("intermediate_size", defaults.get("intermediate_size"),
                                    required="intermediate_size" not in defaults),
        norm_eps=f.number("rms_norm_eps", defaults.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=f.flag("tie_word_embeddings", defaults.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        o_bias=o_bias,
        mlp_bias=f.flag("mlp_bias", False) if model_type in ("llama", "mistral", "qwen2") else False,
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        sliding_window=sliding_window(f),
        activation="gelu_pytorch_tanh" if gemma3 else "silu",
        **(moe_fields(f) if model_type in MOE_FAMILIES else {}),
        **gemma3,
    )



def _opt_spec(f: ConfigFields) -> ModelSpec:
    hidden = f.integer("hidden_size", required=True)
    heads = f.integer("num_attention_heads", required=True)
    f.require(hidden % heads == 0, f"num_attention_heads {heads} does not divide hidden_size {hidden}")
    act = f.text("activation_function", "relu")
    if act != "relu":
        raise UserError(f"{f.where}: activation_function {act!r} is not supported for opt; supported: relu")
    bias = f.flag("enable_bias", True)
    f.flag("_remove_final_layer_norm", False)  # read by spec/layout.py: checked here
    return ModelSpec(
        **_common(f),
        family="opt",
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=f.integer("ffn_dim", required=True),
        norm_eps=1e-5,
        tie_word_embeddings=f.flag("tie_word_embeddings", True),
        attention_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        word_embed_proj_dim=f.integer("word_embed_proj_dim", hidden),
        do_layer_norm_before=f.flag("do_layer_norm_before", True),
        position_offset=2,
        activation="relu",
    )
