"""Continuous refill against the longest row: `python -m flexgen_dist.bench.refill`.

The same prompts run three ways in one process, on one model and placement:
- uniform: every prompt generates the same number of tokens (the mean);
- varied: each prompt stops at its own point (limits drawn from 1 to 2 x mean - 1, adjusted so the
  total equals uniform's), with refill: a finished row takes the next prompt;
- varied, --no-refill: each block runs until its longest row ends.
Each prints generation throughput (generated tokens over prefill + decode seconds, as FlexGen
counts it), row utilization (generated tokens over the row-steps computed) and its ratio to
uniform's throughput. `--placement offloaded` puts every weight on disk (in --offload-dir).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from ..api.generation import RunSettings
from ..api.llm import LLM
from ..api.runtime import Runtime
from ..files import write_atomic
from ..jobs.config import tokenize_job
from ..jobs.inputs import read_job_file
from ..planning.policy import Policy

PLACEMENTS = {
    "memory": (100, 0, 100, 0, 100, 0),
    "offloaded": (0, 0, 100, 0, 100, 0),  # weights on disk, cache and activations in memory
}


def limits_with_mean(count: int, mean: int, seed: int) -> list[int]:
    """`count` limits in [1, 2 * mean - 1], spread evenly, summing to count * mean."""
    rng = random.Random(seed)
    limits = [rng.randint(1, 2 * mean - 1) for _ in range(count)]
    while sum(limits) != count * mean:  # nudge random rows toward the total, inside the range
        i = rng.randrange(count)
        step = 1 if sum(limits) < count * mean else -1
        if 1 <= limits[i] + step <= 2 * mean - 1:
            limits[i] += step
    return limits


def run(llm: LLM, prompts: list[list[int]], limits: list[int], folder: Path) -> dict:
    path = folder / f"job-{len(list(folder.iterdir()))}.jsonl"
    write_atomic(path, "".join(json.dumps({"id": i, "input_ids": p, "max_new_tokens": n}) + "\n"
                               for i, (p, n) in enumerate(zip(prompts, limits))).encode())
    prepared = tokenize_job(read_job_file(path, None), tokenizer=None, spec=llm.spec, max_new_tokens=max(limits),
                            truncate="none", stop=())
    stats = llm.generate_requests(prepared, RunSettings(max_new_tokens=max(limits), ignore_eos=True), lambda items: None)
    return {"tokens": stats.generated_tokens, "seconds": stats.total_s, "tokens_per_s": stats.tokens_per_s,
            "row_utilization": stats.row_utilization}


def main(argv: list[str] | None = None) -> None:
    from .. import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="python -m flexgen_dist.bench.refill", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--mean-new", type=int, default=61, help="mean new tokens per prompt")
    parser.add_argument("--prompt-lens", default="8,48", help="prompt lengths drawn from this range")
    parser.add_argument("--block", default="8x1", help="gpu batch size x number of gpu batches")
    parser.add_argument("--placement", choices=sorted(PLACEMENTS), default="memory")
    parser.add_argument("--offload-dir", default=None)
    parser.add_argument("--compute-dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gbs, ngb = (int(x) for x in args.block.split("x"))
    lo, hi = (int(x) for x in args.prompt_lens.split(","))
    rng = random.Random(args.seed)
    policy = Policy(gpu_batch_size=gbs, num_gpu_batches=ngb, **dict(zip(
        ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent", "act_gpu_percent", "act_cpu_percent"),
        PLACEMENTS[args.placement])))
    offload = args.offload_dir or tempfile.mkdtemp(prefix="bench-refill-")
    limits = limits_with_mean(args.prompts, args.mean_new, args.seed)
    rows, prompts = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for refill in (True, False):
            runtime = Runtime(device="cpu", compute_dtype=args.compute_dtype, refill=refill)
            with LLM(args.model, policy=policy, runtime=runtime, offload_dir=offload) as llm:
                if prompts is None:  # the same prompts for every run
                    vocab = llm.spec.vocab_size
                    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(args.prompts)]
                run(llm, prompts[:gbs * ngb], [4] * (gbs * ngb), Path(tmp))  # warm-up
                if refill:
                    rows.append(("uniform", run(llm, prompts, [args.mean_new] * args.prompts, Path(tmp))))
                rows.append((f"varied, {'refill' if refill else '--no-refill'}", run(llm, prompts, limits, Path(tmp))))
    base = rows[0][1]["tokens_per_s"]
    print(f"model {args.model}, {args.prompts} prompts of {lo}-{hi} tokens, mean {args.mean_new} new "
          f"(varied: {min(limits)}-{max(limits)}), block {args.block}, {args.placement}, {args.compute_dtype}")
    print("| run | tokens | seconds | tok/s | rows busy | / uniform |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | {r['row_utilization']:.0%} "
              f"| {r['tokens_per_s'] / base:.2f} |")


if __name__ == "__main__":
    main()
