"""Tiny GGUF files written from the tiny Hugging Face checkpoints (tests/tiny_models.py), as
llama.cpp's convert_hf_to_gguf.py writes them: its metadata keys, gguf's tensor names, the q and k
projections of a llama permuted for llama.cpp's rope, 1-D tensors (norms, biases) in F32, the
matrices in the type asked for (quantized with the gguf package), and the tiny models' byte-level
tokenizer as a "gpt2" vocabulary with one merge.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from safetensors.numpy import load_file

import tiny_models

MERGED = 260  # the id of the one merged token ("h" + "e")


def _permute(weights: np.ndarray, n_head: int, n_kv_head: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: per head, rows (2, head_dim / 2) -> (head_dim / 2, 2)."""
    if n_kv_head is not None and n_head != n_kv_head:
        n_head = n_kv_head
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tokens(vocab_size: int) -> tuple[list[str], list[int]]:
    """The byte tokenizer's vocabulary (tiny_models.make_byte_tokenizer) with token types."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=tiny_models._byte_of)
    tokens = ["<pad>", "<s>", "</s>", "<unk>"] + alphabet
    types = [3, 3, 3, 2] + [1] * len(alphabet)  # control, control, control, unknown, normal
    tokens.append("he")
    types.append(1)
    while len(tokens) < vocab_size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)
    return tokens, types


def write_gguf(hf_dir, path, matrix_type: str = "F32", *, types: dict[str, str] | None = None,
               architecture: str | None = None, name: str = "tiny", tokenizer: bool = True) -> pathlib.Path:
    """Write the checkpoint of `hf_dir` as the GGUF file `path`. Every matrix is `matrix_type` (F32,
    F16, BF16 or a gguf quantization type such as Q8_0) unless `types` names another for a tensor
    (by its GGUF name, e.g. {"output.weight": "Q8_0"}); `architecture` overrides the file's (a
    Mistral checkpoint is written as "llama", as llama.cpp does)."""
    import gguf

    hf_dir, path = pathlib.Path(hf_dir), pathlib.Path(path)
    config = json.loads((hf_dir / "config.json").read_text())
    model_type = config["model_type"]
    arch = architecture or model_type
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads")
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    if tokenizer:
        tokens, token_types = _tokens(config["vocab_size"])
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(["h e"])
        writer.add_bos_token_id(tiny_models.BOS_ID)
        writer.add_eos_token_id(tiny_models.EOS_ID)
        writer.add_pad_token_id(tiny_models.PAD_ID)
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     config["num_hidden_layers"])
    for key, value in sorted(load_file(hf_dir / "model.safetensors").items()):
        base, suffix = key.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        value = value.astype(np.float32)
        if arch == "llama" and ".attn_q." in gguf_name:  # llama.cpp's LlamaModel (Mistral too)
            value = _permute(value, heads, heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            value = _permute(value, heads, kv_heads)
        kind = (types or {}).get(gguf_name, matrix_type) if value.ndim >= 2 else "F32"
        if kind == "F32":
            writer.add_tensor(gguf_name, value)
        elif kind == "F16":
            writer.add_tensor(gguf_name, value.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(gguf_name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
