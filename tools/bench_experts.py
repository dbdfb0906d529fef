"""What a decode step of a mixture of experts loads, with its experts on disk: only the experts
its rows chose (storage/weights.py OnDemand) against every expert of each layer, for blocks of
1 to 128 rows; bytes read per decode step, the share of experts loaded (against the cost model's
1 - (1 - k/E)^rows) and decode throughput, both ways in this run, on this machine.

    PYTHONPATH=$PWD python tools/bench_experts.py [--rows 1,8,32,128] [--prompt-len 32] [--gen-len 16]
                                                  [--drop-page-cache] [--dir /tmp/bench-experts]

The model is the random mixtral-360m checkpoint (bench/checkpoints.py: 8 experts, 2 per token,
8 layers, bf16), written once into --dir. Every weight is on disk (read through the page cache
unless --drop-page-cache evicts what each read brought in, or a memory cgroup caps the run); the
KV cache and activations are in memory. Bytes count each weight's stored bytes as a load moves
them; a decode step's are (bytes after G new tokens - bytes after 1) / (G - 1).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from flexgen_dist import LLM, Policy, Runtime
from flexgen_dist.bench.checkpoints import make_random_checkpoint
from flexgen_dist.planning.cost_terms import chosen_share
from flexgen_dist.planning.placement import Workload
from flexgen_dist.sizes import format_size
from flexgen_dist.spec.model import ModelSpec
from flexgen_dist.storage.tiers import DiskIO

SHAPE = "mixtral-360m"


def measure(model: Path, offload: Path, rows: int, prompt_len: int, gen_len: int, on_demand: bool,
            drop_page_cache: bool) -> dict:
    """One block of `rows` prompts: decode bytes per step, the share of experts loaded, decode tok/s."""
    gbs = min(rows, 32)
    policy = Policy(gpu_batch_size=gbs, num_gpu_batches=rows // gbs, w_gpu_percent=0, w_cpu_percent=0,
                    cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0,
                    experts_on_demand=on_demand)
    runtime = Runtime(device="cpu", compute_dtype="bfloat16", refill=False,
                      disk_io=DiskIO(drop_page_cache=drop_page_cache), workload=Workload(prompt_len, gen_len),
                      num_prompts=rows)
    rng = random.Random(rows)
    prompts = [[rng.randrange(3, 32000) for _ in range(prompt_len)] for _ in range(rows)]
    with LLM(str(model), policy=policy, offload_dir=str(offload), runtime=runtime) as llm:
        predicted = rows / llm.plan.estimate.decode.seconds  # the cost model's mean decode step
        c = llm.weights.counts
        llm.generate(prompts, max_new_tokens=1, ignore_eos=True)  # a prefill's loads (and torch's warm-up)
        prefill_bytes = c.nbytes
        start = (c.nbytes, c.experts_offered, c.experts_loaded)
        stats = llm.generate(prompts, max_new_tokens=gen_len, ignore_eos=True).stats
        decode_bytes = (c.nbytes - start[0] - prefill_bytes) / (gen_len - 1)
        offered, loaded = c.experts_offered - start[1], c.experts_loaded - start[2]
    return {"decode_bytes": decode_bytes, "share": loaded / offered if offered else 1.0,
            "decode_tok_s": stats.decode_tokens_per_s, "predicted_tok_s": predicted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32,128", help="block sizes (rows), comma-separated")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--drop-page-cache", action="store_true", help="evict each disk read's pages: read the disk")
    parser.add_argument("--dir", default="/tmp/bench-experts", help="checkpoint and offload folder")
    args = parser.parse_args()
    root = Path(args.dir)
    model = make_random_checkpoint(SHAPE, root / SHAPE, dtype="bfloat16")
    spec = ModelSpec.from_dir(model)
    E, k = spec.num_experts, spec.num_experts_per_tok
    print(f"{SHAPE}: {E} experts, {k} per token, {spec.num_layers} layers; every weight on disk"
          f"{' (page cache dropped after each read)' if args.drop_page_cache else ' (through the page cache)'}; "
          f"prompts of {args.prompt_len}, {args.gen_len} new tokens; bf16 on the CPU")
    print("rows | decode bytes/step: chosen / every expert | experts loaded: measured (model) | "
          "decode tok/s: chosen / every expert (ratio) | predicted: chosen / every expert")
    for rows in (int(r) for r in args.rows.split(",")):
        chosen = measure(model, root / "offload", rows, args.prompt_len, args.gen_len, True, args.drop_page_cache)
        every = measure(model, root / "offload", rows, args.prompt_len, args.gen_len, False, args.drop_page_cache)
        print(f"{rows:4d} | {format_size(chosen['decode_bytes']):>9} / {format_size(every['decode_bytes']):>9} | "
              f"{chosen['share']:.0%} ({chosen_share(E, k, rows):.0%}) | {chosen['decode_tok_s']:7.1f} / "
              f"{every['decode_tok_s']:7.1f} ({chosen['decode_tok_s'] / every['decode_tok_s']:.2f}x) | "
              f"{chosen['predicted_tok_s']:7.1f} / {every['predicted_tok_s']:7.1f}", flush=True)


if __name__ == "__main__":
    main()
