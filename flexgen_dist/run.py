"""`python -m flexgen_dist.run`: batch generation from the command line.

With no arguments it runs the bundled default model on a few built-in prompts and prints their
continuations, then one summary line with prefill, decode and total throughput.
"""

from __future__ import annotations

import argparse
import random
import sys

from pathlib import Path

from . import DEFAULT_MODEL
from .engine.trace import Tracer
from .frontend.api import LLM
from .frontend.cli import add_model_args, dist_from_args, llm_kwargs_from_args, run_command, start_pipeline
from .frontend.jobfiles import check_writable, read_jsonl, write_jsonl, write_stats
from .planning.placement import Workload

EXAMPLE_PROMPTS = [
    "The list data type has some more methods.",
    "Return the number of",
    "This module provides",
    "If the optional argument",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexgen_dist.run", description=__doc__.splitlines()[0])
    add_model_args(parser, DEFAULT_MODEL)
    parser.add_argument("--input", help="JSONL prompts: {\"id\": ..., \"prompt\": \"...\"} or {\"id\": ..., \"input_ids\": [...]}")
    parser.add_argument("--output", help="JSONL results, one line per input line in the same order")
    parser.add_argument("--prompt-len", type=int, default=None, help="without --input: random prompts of this many tokens")
    parser.add_argument("--num-prompts", type=int, default=None, help="without --input: how many random prompts (default: one block)")
    parser.add_argument("--gen-len", type=int, default=32, help="new tokens per prompt")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", help="write a Chrome/Perfetto trace (traceEvents JSON) of every op; rank r > 0 writes FILE.rank<r>.json")
    parser.add_argument("--ignore-eos", action="store_true", help="generate --gen-len tokens even past EOS (benchmarks)")
    parser.add_argument("--stats-json", help="also write the run's statistics and policy to this JSON file (rank 0)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the short untimed warm-up run")
    parser.add_argument("--stop-token-ids", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                        help="comma-separated ids that end a sequence (besides EOS)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    contexts = []

    def body() -> int:
        contexts.append(dist_from_args(args))
        with start_pipeline(args, contexts[0]) as pipeline:
            return _run(args, contexts[0], pipeline)

    return run_command(body, rank_of=lambda: contexts[0].rank if contexts else 0)


def _run(args: argparse.Namespace, ctx, pipeline) -> int:
    if args.output and ctx.rank == 0:
        check_writable(args.output)
    lines = read_jsonl(args.input) if args.input else None
    workload = None  # plan for the prompts given, when their lengths are known before tokenizing
    if lines is None:
        workload = Workload(args.prompt_len or 32, args.gen_len)
    elif all(isinstance(line.prompt, list) for line in lines):
        workload = Workload(max(len(line.prompt) for line in lines), args.gen_len)
    kwargs = llm_kwargs_from_args(args, ctx, workload)
    tracer = Tracer(pid=ctx.rank) if args.trace else None
    llm = LLM(args.model, pipeline=pipeline, tracer=tracer, **kwargs)
    policy = llm.policy
    try:
        if lines is not None:
            prompts = [line.prompt for line in lines]
        elif args.prompt_len is not None or llm.tokenizer is None:
            rng = random.Random(args.seed)
            count = args.num_prompts or policy.block_size
            length = args.prompt_len or 32
            prompts = [[rng.randrange(llm.spec.vocab_size) for _ in range(length)] for _ in range(count)]
        else:
            prompts = EXAMPLE_PROMPTS[: args.num_prompts] if args.num_prompts else EXAMPLE_PROMPTS
        if not args.no_warmup:  # first calls pay torch's lazy initialisation; keep it out of the timing
            llm.generate([prompts[0]], max_new_tokens=min(2, args.gen_len))
            if tracer is not None:
                tracer.reset()
        result = llm.generate(
            prompts,
            max_new_tokens=args.gen_len,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_token_ids=args.stop_token_ids,
            ignore_eos=args.ignore_eos,
        )
    finally:
        llm.close()
    if tracer is not None:
        path = Path(args.trace)
        tracer.write(path if ctx.rank == 0 else path.with_suffix(f".rank{ctx.rank}{path.suffix}"))
    if ctx.rank != 0:
        return 0  # rank 0 alone writes results and prints the summary
    if args.output:
        rows = []
        for line, out in zip(lines or [None] * len(result.outputs), result.outputs):
            row = {"id": line.id if line is not None else len(rows), "output_ids": out.output_ids}
            if out.text is not None:
                row["text"] = out.text
            rows.append(row)
        write_jsonl(args.output, rows)
    elif lines is None and all(isinstance(p, str) for p in prompts):
        for prompt, out in zip(prompts, result.outputs):
            print(f"{prompt!r} -> {out.text!r}")
    if args.stats_json:
        write_stats(args.stats_json, result.stats, llm.policy, ctx.world_size)
    print(f"throughput: {result.stats.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
