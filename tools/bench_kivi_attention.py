"""Decode attention over a 4-bit KV cache read in place: KIVI's layout against min-max's.

    PYTHONPATH=$PWD python tools/bench_kivi_attention.py [--repeats 128] [--device cpu|cuda]

For each shape, both caches hold the same S positions (KIVI: groups of --group-size slots
quantized, the rest in its full-precision window); one decode step is timed as the engine runs
it over a cache in place (engine/kv_views.py StoredKV): write the step's keys and values, attend
over every position (dequantizing chunk by chunk), and store (KIVI: quantize a group the step
completed, amortized over the group's steps: every step of whole groups is timed). Both are timed
in this run, interleaved, on this machine with the same threads: the steps are dealt into
--rounds rounds (step i to round i mod rounds) and the round of least total time is kept, per
step; then the ratio KIVI / min-max (> 1: KIVI slower).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from flexgen_dist.engine.kv_views import StoredKV
from flexgen_dist.planning.compression import CompressionConfig
from flexgen_dist.planning.placement import Tier
from flexgen_dist.planning.tiers import cache_parts, pack
from flexgen_dist.storage.quantize import compressed_in_memory
from flexgen_dist.storage.kivi import kivi_in_memory
from flexgen_dist.storage.quantize import empty_quantized

SHAPES = {  # name: (batch, kv heads, head dim, query heads, positions)
    "bundled model (4.9M)": (32, 2, 32, 8, 512),
    "Llama-2-7B layer": (8, 32, 128, 32, 1024),
    "Llama-3-8B layer (GQA)": (16, 8, 128, 32, 2048),
}
_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


def kivi_pair(shape, config, device, valid):
    pair = []
    for which in ("k", "v"):
        pieces, nbytes = pack(cache_parts("c", which, shape, config, "float32"))
        buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        views = {p.part: buffer[p.offset : p.offset + math.prod(p.shape) * _DTYPES[p.dtype].itemsize]
                 .view(_DTYPES[p.dtype]).view(p.shape) for p in pieces}
        pair.append(kivi_in_memory(which, views, shape, config, Tier.GPU, valid))
    return pair


def minmax_pair(shape, config, device):
    pair = []
    for _ in ("k", "v"):
        q = empty_quantized(shape, config, device)
        pair.append(compressed_in_memory((q.data, q.scale, q.mins), shape, config, Tier.GPU))
    return pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=192, help="decode steps timed")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the steps (the best is kept)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device {device}, {torch.get_num_threads()} threads, 4 bits, groups of {args.group_size}, "
          f"{args.repeats} steps in {args.rounds} rounds, the best")
    print(f"{'shape':<26} {'min-max ms':>11} {'KIVI ms':>9} {'KIVI / min-max':>15}")
    for name, (B, nkv, hd, nh, S) in SHAPES.items():
        torch.manual_seed(0)
        shape = (S + args.repeats + 1, B, nkv, hd)
        past = torch.randn(S - 1, B, nkv, hd, device=device)
        valid = torch.ones(B, shape[0], dtype=torch.bool)
        kivi = kivi_pair(shape, CompressionConfig(group_size=args.group_size), device, valid)
        minmax = minmax_pair(shape, CompressionConfig(group_size=args.group_size, cache_method="minmax"), device)
        for t in (*kivi, *minmax):
            t.write(slice(0, S - 1), past)
        q = torch.randn(B, nh, 1, hd, device=device)
        k_new, v_new = torch.randn(B, nkv, 1, hd, device=device), torch.randn(B, nkv, 1, hd, device=device)
        times = {"minmax": [], "kivi": []}
        for step in range(args.repeats):
            slot = S - 1 + step  # the steps of whole groups: KIVI's quantization of each amortized
            mask = torch.ones(B, 1, 1, slot + 1, dtype=torch.bool, device=device)
            for method, (k, v) in (("minmax", minmax), ("kivi", kivi)):
                view = StoredKV(k, v, device)
                sync()
                begin = time.perf_counter()
                view.write(slice(slot, slot + 1), k_new, v_new)
                view.attend(q, mask, 0.1, slice(slot, slot + 1))
                for t in (k, v):
                    if hasattr(t, "seal"):
                        t.seal()
                sync()
                times[method].append(time.perf_counter() - begin)
        # per step: the best of `rounds` runs of every step of whole groups (a shared machine
        # slows some runs; the total amortizes KIVI's quantization over its group)
        a, b = (min(sum(times[m][r::args.rounds]) for r in range(args.rounds)) / (args.repeats // args.rounds) * 1e3
                for m in ("minmax", "kivi"))
        print(f"{name:<26} {a:>11.2f} {b:>9.2f} {b / a:>15.2f}")


if __name__ == "__main__":
    main()
