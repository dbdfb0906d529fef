"""Where 4-bit KIVI keys lose attention, on the bundled model's held-out text: the KL divergence of
each query's attention over keys quantized one way from its attention over exact keys, for
choices the cache does not make yet (pre-RoPE keys, a group of its own, the first slots exact).

    python tools/kivi_key_error.py [--tokens 512] [--window 128] [--every 16]

transformers computes the text once in fp32; its keys before and after RoPE are taken at each
layer's `apply_rotary_pos_emb`. Each query from position 255 on (every `--every`) attends over
keys 0..t, all but the newest `--window` slots (whole groups) quantized as KIVI quantizes them:
4-bit min-max per channel over groups of G consecutive slots. "pre-RoPE" quantizes the keys before
the rotation and rotates the quantized keys (KVQuant's choice). A measure of what to try next, not
of the engine: greedy agreement (tools/cache_dtype_match.py) is what users see.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama import modeling_llama

from flexgen_dist import DEFAULT_MODEL
from flexgen_dist.eval import DEFAULT_TEXT


def keys_of(text: str, tokens: int) -> list[dict[str, torch.Tensor]]:
    """Per layer: queries and keys after RoPE, keys before it, and the rotation's cos and sin."""
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    layers, rotate = [], modeling_llama.apply_rotary_pos_emb

    def taken(q, k, cos, sin, *args, **kwargs):
        q_rot, k_rot = rotate(q, k, cos, sin, *args, **kwargs)
        layers.append({"q": q_rot, "k": k_rot, "k_pre": k, "cos": cos[:, None], "sin": sin[:, None]})
        return q_rot, k_rot

    modeling_llama.apply_rotary_pos_emb = taken
    try:
        with torch.no_grad():
            model(ids)
    finally:
        modeling_llama.apply_rotary_pos_emb = rotate
    return layers


def per_channel(keys: torch.Tensor, group: int, bits: int = 4) -> torch.Tensor:
    """(B, h, S, d) keys, S a multiple of `group`, quantized and back: min-max over each group of slots."""
    B, h, S, d = keys.shape
    groups = keys.reshape(B, h, S // group, group, d)
    lo, hi = groups.amin(3, keepdim=True), groups.amax(3, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / (2**bits - 1)
    return (((groups - lo) / scale).round().clamp(0, 2**bits - 1) * scale + lo).reshape(B, h, S, d)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def attention_kl(layers, *, group: int, pre_rope: bool, exact_first: int, window: int, every: int) -> float:
    kls = []
    for layer in layers:
        q, k = layer["q"], layer["k"]
        repeat, scale = q.shape[1] // k.shape[1], q.shape[-1] ** -0.5
        for t in range(255, k.shape[2], every):
            n = max(0, (t + 1 - window) // group * group)  # slots quantized: whole groups older than the window
            if pre_rope:
                old = rope(per_channel(layer["k_pre"][:, :, :n], group), layer["cos"][..., :n, :], layer["sin"][..., :n, :])
            else:
                old = per_channel(k[:, :, :n], group)
            old[:, :, :exact_first] = k[:, :, :min(exact_first, n)]
            stored = torch.cat([old, k[:, :, n : t + 1]], dim=2).repeat_interleave(repeat, 1)
            exact = k[:, :, : t + 1].repeat_interleave(repeat, 1)
            p = torch.softmax(q[:, :, t : t + 1] @ exact.transpose(-1, -2) * scale, -1)
            p_stored = torch.softmax(q[:, :, t : t + 1] @ stored.transpose(-1, -2) * scale, -1)
            kls.append((p * (p.clamp_min(1e-12).log() - p_stored.clamp_min(1e-12).log())).sum(-1).mean().item())
    return sum(kls) / len(kls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens of the held-out text (the model's context)")
    parser.add_argument("--window", type=int, default=128, help="newest slots kept exact (KIVI's window)")
    parser.add_argument("--every", type=int, default=16, help="score every n-th query position")
    args = parser.parse_args()
    layers = keys_of(Path(DEFAULT_TEXT).read_text(encoding="utf-8"), args.tokens)
    print(f"{'keys':<34} {'KL of attention':>16}")
    for label, settings in [
        ("after RoPE, groups of 64 (today)", dict(group=64, pre_rope=False, exact_first=0)),
        ("after RoPE, groups of 32", dict(group=32, pre_rope=False, exact_first=0)),
        ("before RoPE, groups of 64", dict(group=64, pre_rope=True, exact_first=0)),
        ("before RoPE, groups of 32", dict(group=32, pre_rope=True, exact_first=0)),
        ("after RoPE, 64, first 16 exact", dict(group=64, pre_rope=False, exact_first=16)),
        ("after RoPE, 64, first 64 exact", dict(group=64, pre_rope=False, exact_first=64)),
        ("before RoPE, 64, first 64 exact", dict(group=64, pre_rope=True, exact_first=64)),
    ]:
        kl = attention_kl(layers, window=args.window, every=args.every, **settings)
        print(f"{label:<34} {kl:>16.5f}")


if __name__ == "__main__":
    main()
