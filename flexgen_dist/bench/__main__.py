"""`python -m flexgen_dist.bench`: throughput benchmarks that print ratios measured in the same run.

    python -m flexgen_dist.bench --ranks 1,2 --model DIR --gpu-mem 300M --cpu-mem 0 --offload-dir /tmp/off

prints decode throughput per rank count (pipeline scaling), with per-rank capacities that decide
how much of each rank's layers fits in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from .. import DEFAULT_MODEL
from ..errors import UserError
from ..frontend.cli import run_command
from .scaling import format_table, run_ranks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexgen_dist.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", required=True, help="comma-separated rank counts to compare, e.g. 1,2")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face model folder (default: the bundled model)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--gpu-batch-size", type=int, default=8)
    parser.add_argument("--num-gpu-batches", type=int, default=1)
    parser.add_argument("--gpu-mem", default=None, help="per-rank gpu-tier capacity (with --cpu-mem)")
    parser.add_argument("--cpu-mem", default=None, help="per-rank cpu-tier capacity (with --gpu-mem)")
    parser.add_argument("--percent", nargs=6, default=None, help="fixed placement instead of capacities")
    parser.add_argument("--offload-dir", default=None, help="disk tier folder (default: a temporary folder)")
    parser.add_argument("--drop-page-cache", action="store_true", help="disk reads measure the disk, not RAM")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads shared by the ranks")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _scaling(args))


def _scaling(args: argparse.Namespace) -> int:
    try:
        ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--ranks {args.ranks!r} must be comma-separated whole numbers, e.g. 1,2") from None
    if not ranks or min(ranks) < 1:
        raise UserError(f"--ranks {args.ranks!r} must list rank counts >= 1")
    block = args.gpu_batch_size * args.num_gpu_batches
    offload = args.offload_dir or tempfile.mkdtemp(prefix="flexgen-bench-")
    run_args = [
        "--model", args.model, "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
        # every rank count runs the same prompts: enough blocks to fill the longest pipeline
        "--num-prompts", str(block * max(ranks)),
        "--gpu-batch-size", str(args.gpu_batch_size), "--num-gpu-batches", str(args.num_gpu_batches),
        "--offload-dir", offload, "--ignore-eos",
    ]
    if args.gpu_mem or args.cpu_mem:
        run_args += ["--gpu-mem", str(args.gpu_mem), "--cpu-mem", str(args.cpu_mem)]
    if args.percent:
        run_args += ["--percent", *args.percent]
    if args.drop_page_cache:
        run_args.append("--drop-page-cache")
    runs = []
    for r in ranks:
        runs.append(run_ranks(r, run_args, cores=args.cores))
        print(f"ranks={r}: decode {runs[-1].decode_tokens_per_s:.2f} tok/s", file=sys.stderr, flush=True)
    print(f"model {args.model}, prompt {args.prompt_len}, gen {args.gen_len}, block {block} "
          f"({args.gpu_batch_size}x{args.num_gpu_batches}), per-rank gpu-mem {args.gpu_mem}, cpu-mem {args.cpu_mem}, "
          f"{args.cores} cores shared, page cache {'dropped' if args.drop_page_cache else 'kept'}")
    print(format_table(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in runs], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
