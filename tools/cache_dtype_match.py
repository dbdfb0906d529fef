"""How often greedy output still equals transformers' (fp32, CPU) when the KV cache is stored in
16 bits (or compressed), or the layers compute in bfloat16, on the bundled model's held-out text.
The cache settings compute in float32, so only the cache differs from the reference.

    python tools/cache_dtype_match.py [--prompts 100] [--new-tokens 32] [--prompt-tokens 32] [--stream] [--only TEXT]

Prompts: the first `--prompt-tokens` tokens of the first `--prompts` held-out passages (over 200
characters), in file order; with --stream, `--prompts` evenly spaced cuts of the whole text (the
passages are short, half under 78 tokens). For each setting it prints the share of prompts whose
whole continuation equals transformers', and the share of tokens generated before the first
difference. (The fp32 engine's own greedy output equals transformers' on all of them, so this is
also the agreement with the uncompressed engine.) A KIVI cache keeps its newest slots in full
precision: the last 128 by default, in whole groups of --compress-group-size slots (from one
group less to the window less one). A cache of 32 + 32 slots fits that window and is never
quantized; --stream with long prompts, smaller groups or no window (0: only the group being
filled) show what quantization costs.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexgen_dist import DEFAULT_MODEL, LLM, Policy, Runtime
from flexgen_dist.eval import DEFAULT_TEXT
from flexgen_dist.planning.compression import CompressionConfig

def _compressed(**config) -> Policy:
    return Policy(gpu_batch_size=32, compress_cache=True, compression=CompressionConfig(**config))


SETTINGS = {
    "fp32 cache (default)": Policy(gpu_batch_size=32),
    "fp16 cache": Policy(gpu_batch_size=32, cache_dtype="float16"),
    "bf16 cache": Policy(gpu_batch_size=32, cache_dtype="bfloat16"),
    "8-bit min-max": _compressed(bits=8, cache_method="minmax"),
    "8-bit KIVI": _compressed(bits=8),
    "4-bit min-max": _compressed(cache_method="minmax"),
    "4-bit KIVI": _compressed(),  # groups of 64 slots, a window of 128 slots
    "4-bit KIVI, window 0": _compressed(cache_window=0),
    "4-bit KIVI, groups of 32": _compressed(group_size=32),
    "4-bit KIVI, groups of 32, window 0": _compressed(group_size=32, cache_window=0),
    "4-bit KIVI, groups of 16": _compressed(group_size=16),
    "4-bit KIVI, groups of 16, window 0": _compressed(group_size=16, cache_window=0),
}
COMPUTE = {name: "float32" for name in SETTINGS}
SETTINGS["bf16 compute"], COMPUTE["bf16 compute"] = Policy(gpu_batch_size=32), "bfloat16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--only", default=None, metavar="TEXT", help="only the settings whose name holds TEXT")
    parser.add_argument("--stream", action="store_true",
                        help="cut the prompts from the held-out text as one stream of tokens, evenly spaced (the "
                             "passages are short: half under 78 tokens), so every prompt has --prompt-tokens")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    docs = [d.strip() for d in open(DEFAULT_TEXT, encoding="utf-8").read().split("\n\n") if len(d.strip()) > 200]
    prompts = [tok(d)["input_ids"][: args.prompt_tokens] for d in docs[: args.prompts]]
    if args.stream:
        stream = tok(open(DEFAULT_TEXT, encoding="utf-8").read())["input_ids"]
        stride = (len(stream) - args.prompt_tokens) // args.prompts
        prompts = [stream[i * stride : i * stride + args.prompt_tokens] for i in range(args.prompts)]
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    reference = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=args.new_tokens,
                                 pad_token_id=tok.pad_token_id or 0)
            reference.append(out[0, len(ids):].tolist())
    print(f"{len(prompts)} held-out prompts of {'' if args.stream else 'up to '}{args.prompt_tokens} tokens"
          f"{' cut from the text as one stream' if args.stream else ''}, {args.new_tokens} new tokens, greedy")
    print(f"{'cache':<36} {'same output':>12} {'tokens before the first difference':>36}")
    for name, policy in SETTINGS.items():
        if args.only is not None and args.only not in name:
            continue
        with LLM(DEFAULT_MODEL, policy=policy, runtime=Runtime(device="cpu", compute_dtype=COMPUTE[name])) as llm:
            got = [o.output_ids for o in llm.generate(prompts, max_new_tokens=args.new_tokens).outputs]
        same = sum(g == r for g, r in zip(got, reference))
        agree = 0
        total = 0
        for g, r in zip(got, reference):
            total += len(r)
            for a, b in zip(g, r):
                if a != b:
                    break
                agree += 1
        print(f"{name:<36} {same:>5}/{len(prompts):<6} {100 * agree / total:>35.1f}%")


if __name__ == "__main__":
    main()
