"""`python -m flexgen_dist.bench`: throughput benchmarks that print ratios measured in the same run.

Compare systems (default) on FlexGen's workload shape, each at its best batch that fits:

    python -m flexgen_dist.bench --shape opt-1.3b --prompt-len 64 --gen-len 16 --mem-limit 4G

Pipeline scaling (decode throughput per rank count, with per-rank capacities):

    python -m flexgen_dist.bench --ranks 1,2 --model DIR --gpu-mem 300M --cpu-mem 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from .. import DEFAULT_MODEL
from ..errors import UserError
from ..frontend.cli import run_command
from ..planning.sizes import format_size, parse_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexgen_dist.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: --shape, else the bundled model)")
    parser.add_argument("--shape", default=None, help="a random-weight OPT checkpoint of this shape: opt-125m, opt-1.3b, opt-6.7b, ...")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--offload-dir", default=None, help="disk tier / offload folder (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    compare = parser.add_argument_group("comparing systems")
    compare.add_argument("--systems", default="ours,transformers,accelerate", help="comma-separated: ours, transformers, accelerate")
    compare.add_argument("--mem-limit", default=None, help="cap every system's memory (cgroup; page cache evicted before each run)")
    compare.add_argument("--budget", default=None,
                         help="RAM each system may fill with weights and cache (Accelerate's max_memory; our tiers); "
                              "default: the cap minus 1.5 GiB for the process itself, none without a cap")
    compare.add_argument("--batches", default="8,16,32,64", help="batches tried for the baselines, while they fit")
    compare.add_argument("--blocks", default="8x1,16x1,32x1,32x2,32x4,32x8",
                         help="our blocks tried (gpu batch size x gpu batches), while they fit")
    scaling = parser.add_argument_group("pipeline scaling")
    scaling.add_argument("--ranks", default=None, help="comma-separated rank counts to compare, e.g. 1,2")
    scaling.add_argument("--gpu-batch-size", type=int, default=8)
    scaling.add_argument("--num-gpu-batches", type=int, default=1)
    scaling.add_argument("--gpu-mem", default=None, help="per-rank gpu-tier capacity (with --cpu-mem)")
    scaling.add_argument("--cpu-mem", default=None, help="per-rank cpu-tier capacity (with --gpu-mem)")
    scaling.add_argument("--percent", nargs=6, default=None, help="fixed placement instead of capacities")
    scaling.add_argument("--drop-page-cache", action="store_true", help="disk reads measure the disk, not RAM")
    scaling.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads shared by the ranks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _scaling(args) if args.ranks else _compare(args))


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} must be comma-separated whole numbers, e.g. 1,2") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} {text!r} must list whole numbers >= 1")
    return values


def _model_dir(args: argparse.Namespace, offload: Path) -> Path:
    if args.model and args.shape:
        raise UserError("give --model or --shape, not both")
    if args.shape:
        from .checkpoints import SHAPES, make_random_checkpoint

        if args.shape not in SHAPES:
            raise UserError(f"unknown --shape {args.shape!r}; known: {', '.join(SHAPES)}")
        return make_random_checkpoint(args.shape, offload / f"checkpoint-{args.shape}")
    return Path(args.model or DEFAULT_MODEL)


def _compare(args: argparse.Namespace) -> int:
    from .compare import Workload, best_baseline, best_ours, format_table

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {"ours", "transformers", "accelerate"}
    if unknown:
        raise UserError(f"--systems: unknown {', '.join(sorted(unknown))}; use ours, transformers, accelerate")
    try:
        blocks = [tuple(int(x) for x in b.lower().split("x")) for b in args.blocks.split(",") if b.strip()]
        assert all(len(b) == 2 and min(b) >= 1 for b in blocks)
    except (ValueError, AssertionError):
        raise UserError(f"--blocks {args.blocks!r} must look like 8x1,32x4 (gpu batch size x gpu batches)") from None
    batches = _int_list(args.batches, "--batches")
    offload = Path(args.offload_dir or tempfile.mkdtemp(prefix="flexgen-bench-"))
    offload.mkdir(parents=True, exist_ok=True)
    mem_limit = parse_size(args.mem_limit, "--mem-limit") if args.mem_limit else None
    if args.budget:
        budget = parse_size(args.budget, "--budget")
    else:
        budget = mem_limit - int(1.5 * 2**30) if mem_limit else None
    if budget is not None and budget <= 0:
        raise UserError("--mem-limit leaves no budget after 1.5 GiB for the process itself; raise it or give --budget")
    workload = Workload(_model_dir(args, offload), args.prompt_len, args.gen_len, mem_limit, budget, offload)
    best, attempts = {}, {}
    for system in systems:
        if system == "ours":
            best[system], attempts[system] = best_ours(workload, blocks)
        else:
            best[system], attempts[system] = best_baseline(system, workload, batches)
        for a in attempts[system]:
            state = f"{a.tokens_per_s:.2f} tok/s" if a.ok else f"failed: {a.error}"
            print(f"{system} batch {a.batch}: {state}", file=sys.stderr, flush=True)
    model = args.shape or workload.model_dir.name
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; model {model}; prompt {args.prompt_len}, "
          f"gen {args.gen_len}; memory cap {format_size(mem_limit) if mem_limit else 'none'}, "
          f"budget {format_size(budget) if budget else 'none'}")
    print(format_table(model, best, attempts))
    if args.json:
        data = {s: [a.__dict__ for a in attempts[s]] for s in systems}
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    return 0


def _scaling(args: argparse.Namespace) -> int:
    from .scaling import format_table, run_ranks

    ranks = _int_list(args.ranks, "--ranks")
    block = args.gpu_batch_size * args.num_gpu_batches
    offload = Path(args.offload_dir or tempfile.mkdtemp(prefix="flexgen-bench-"))
    model = _model_dir(args, offload)
    run_args = [
        "--model", str(model), "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
        # every rank count runs the same prompts: enough blocks to fill the longest pipeline
        "--num-prompts", str(block * max(ranks)),
        "--gpu-batch-size", str(args.gpu_batch_size), "--num-gpu-batches", str(args.num_gpu_batches),
        "--offload-dir", str(offload), "--ignore-eos",
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
    print(f"model {args.shape or model}, prompt {args.prompt_len}, gen {args.gen_len}, block {block} "
          f"({args.gpu_batch_size}x{args.num_gpu_batches}), per-rank gpu-mem {args.gpu_mem}, cpu-mem {args.cpu_mem}, "
          f"{args.cores} cores shared, page cache {'dropped' if args.drop_page_cache else 'kept'}")
    print(format_table(runs))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
