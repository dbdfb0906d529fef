"""Random-weight checkpoints of known shapes for benchmarks (`make_random_checkpoint`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from flexgen_dist.errors import UserError
from flexgen_dist.files import fsync_folder, remove_stale_temps, write_atomic
from flexgen_dist.temp_names import temp_name

# OPT shapes with the real sizes (Zhang et al. 2022, table 1); ffn = 4 * hidden, vocab 50272,
# 2048 positions, pre-LN. "tiny-opt" is for tests. Then one mixture of experts.
_OPT_COMMON = dict(
    model_type="opt",
    vocab_size=50272,
    max_position_embeddings=2048,
    do_layer_norm_before=True,
    enable_bias=True,
    activation_function="relu",
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
    tie_word_embeddings=True,
)
SHAPES: dict[str, dict] = {
    "tiny-opt": dict(_OPT_COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=1024, max_position_embeddings=512),
    "opt-125m": dict(_OPT_COMMON, hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "opt-350m-pre-ln": dict(_OPT_COMMON, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "opt-1.3b": dict(_OPT_COMMON, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32),
    "opt-2.7b": dict(_OPT_COMMON, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32),
    "opt-6.7b": dict(_OPT_COMMON, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32),
    "opt-13b": dict(_OPT_COMMON, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40),
}
for _shape in SHAPES.values():
    _shape.setdefault("ffn_dim", 4 * _shape["hidden_size"])
    _shape.setdefault("word_embed_proj_dim", _shape["hidden_size"])
# A small mixture of experts shaped like Mixtral (8 experts, 2 per token, grouped-query
# attention), 360M parameters of which 280M in experts: the expert-loading benchmark's model.
SHAPES["mixtral-360m"] = dict(model_type="mixtral", hidden_size=1024, intermediate_size=1408, num_hidden_layers=8,
                              num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                              num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=2048,
                              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

_MARKER = ".flexgen_random_checkpoint.json"
_INIT_STD = 0.02  # OPT's initializer_range


# ---------------------------------------------------------------- random checkpoints


def make_random_checkpoint(shape: str, path, dtype: str = "float16", seed: int = 0) -> Path:
    """Write a random-weight Hugging Face checkpoint of a named shape (see `SHAPES`) into the
    folder `path` (config.json + safetensors shards of <= 2 GB, no tokenizer) and return it.

    Weights ~ N(0, 0.02) from a `torch.Generator` seeded with `seed`, LayerNorms 1 and biases 0,
    drawn tensor by tensor in the checkpoint dtype: the model is built on the meta device and
    materialised once, so memory holds the 16-bit model once (opt-1.3b: 2.6 GB, opt-6.7b: 13.4 GB),
    never an fp32 copy. The folder is reused when its marker file says the same shape, dtype and
    seed; a folder without our marker is never overwritten (`UserError`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in SHAPES:
        raise UserError(f"unknown checkpoint shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise UserError(f"unknown checkpoint dtype {dtype!r}; use float16, bfloat16 or float32")
    path = Path(path)
    marker = {"shape": shape, "dtype": dtype, "seed": seed, "config": SHAPES[shape], "format": 1}
    marker_file = path / _MARKER
    if path.exists():
        try:
            existing = json.loads(marker_file.read_text())
        except (OSError, ValueError):
            existing = None
        if existing is None and any(path.iterdir()):
            raise UserError(
                f"{path} exists and is not a random checkpoint written by make_random_checkpoint; "
                "give an empty or new folder"
            )
        if existing == marker and (path / "config.json").exists():
            return path
        shutil.rmtree(path)  # ours, of another shape/seed (or empty): rebuild it

    config_kwargs = dict(SHAPES[shape])
    config = AutoConfig.for_model(config_kwargs.pop("model_type"), **config_kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives every parameter its own storage, untying the head
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied parameters come once
            if name.endswith(".bias"):
                param.zero_()
            elif "norm" in name:  # OPT's layer_norm, Mixtral's RMSNorms
                param.fill_(1.0)
            else:
                param.normal_(0.0, _INIT_STD, generator=generator)
    model.config.dtype = torch_dtype

    # Built in a temporary folder beside `path` (one name scheme with every file we write), renamed
    # whole; folders of killed builds (their pid gone) go first.
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name, folders=True)
    tmp = path.parent / temp_name(path.name)
    os.mkdir(tmp)
    try:
        model.save_pretrained(tmp, max_shard_size="2GB")
        write_atomic(tmp / _MARKER, (json.dumps(marker, indent=1) + "\n").encode())
        del model
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
