"""`python -m flexgen_dist.bench`: throughput benchmarks that print ratios measured in the same run.

Compare systems (default) on FlexGen's workload shape, each in every compute dtype this machine
runs well (measured: a matmul per dtype at the bench's shapes) and at its best batch that fits;
each reports its best dtype and batch. Each of our runs is held against the cost model's bound
for its policy, and our best block is run again with everything in memory (offloaded decode /
in-memory decode):

    python -m flexgen_dist.bench --shape opt-1.3b --workload decode-heavy --mem-limit 4G

Throughput against latency (a CSV and a PNG with each system's Pareto frontier):

    python -m flexgen_dist.bench --sweep --shape opt-1.3b --blocks 8x1,32x1,32x4 --placements gpu,cpu,disk

Pipeline scaling (decode throughput per rank count, with per-rank capacities):

    python -m flexgen_dist.bench --ranks 1,2 --model DIR --gpu-mem 300M --cpu-mem 0
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

from .. import DEFAULT_MODEL
from ..errors import UserError
from ..cli.shell import OneLineParser, run_command
from ..files import write_json_file
from . import checks
from .checks import check_args
from ..sizes import format_size

COMPARE_BLOCKS = "8x1,16x1,32x1,32x2,32x4,32x8"
SWEEP_BLOCKS = "8x1,32x1,32x4"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m flexgen_dist.bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: --shape, else the bundled model)")
    parser.add_argument("--shape", default=None, help="a random-weight checkpoint of this shape: opt-125m, opt-1.3b, opt-6.7b, ... or the mixture of experts mixtral-360m")
    parser.add_argument("--checkpoint-dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="dtype of the --shape checkpoint's weights (default: float16, as OPT's are)")
    parser.add_argument("--workload", default="short",
                        help="prompt and new tokens when --prompt-len / --gen-len are not given: short (64, 16; the "
                             "default) or decode-heavy (64, 128)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: from --workload)")
    parser.add_argument("--gen-len", type=int, default=None, help="new tokens per prompt (default: from --workload)")
    parser.add_argument("--offload-dir", default=None,
                        help="disk tier / offload folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--hardware", default=None,
                        help="speeds the bound is computed from: a JSON file of python -m flexgen_dist.profile --out, or a "
                             "preset (default: this machine's cached profile, measured now when there is none)")
    compare = parser.add_argument_group("comparing systems")
    compare.add_argument("--systems", default="ours,transformers,accelerate", help="comma-separated: ours, transformers, accelerate")
    compare.add_argument("--mem-limit", default=None, help="cap every system's memory (cgroup; page cache evicted before each run)")
    compare.add_argument("--budget", default=None,
                         help="RAM each system may fill with weights and cache (Accelerate's max_memory; our tiers); "
                              "default: the cap minus 1.5 GiB for the process itself, none without a cap")
    compare.add_argument("--batches", default="8,16,32,64", help="batches tried for the baselines, while they fit")
    compare.add_argument("--blocks", default=None,
                         help=f"our blocks tried (gpu batch size x gpu batches), while they fit (default: {COMPARE_BLOCKS}; "
                              f"with --sweep {SWEEP_BLOCKS})")
    compare.add_argument("--baseline-dtypes", default="measured",
                         help="compute dtypes of transformers and Accelerate, comma-separated from float32, float16, "
                              "bfloat16; default: measured, those whose matmul rate here is at least half the "
                              "fastest's at the bench's shapes")
    compare.add_argument("--ours-dtypes", default="measured",
                         help="our compute dtypes (run's --compute-dtype values, auto included where run has it); "
                              "default: measured, the same as the baselines'")
    compare.add_argument("--ours-flags", default="",
                         help="more flags of python -m flexgen_dist.run for every run of ours, in one quoted string, "
                              "e.g. --ours-flags='--compress-weight --compress-cache'")
    sweep = parser.add_argument_group("throughput against latency (--sweep)")
    sweep.add_argument("--sweep", action="store_true", help="run a grid of our policies (--blocks x --placements) and the "
                                                            "baselines (--batches), write --sweep-csv and --sweep-png")
    sweep.add_argument("--placements", default="gpu,cpu,disk",
                       help="our placements: gpu, cpu, mixed, disk, or six percentages joined by '/' as --percent takes "
                            "them, e.g. 20/30/100/0/100/0")
    sweep.add_argument("--max-latencies", default=None,
                       help="comma-separated seconds: one planner point each (run's --policy auto --max-latency), once run has it")
    sweep.add_argument("--sweep-csv", default="sweep.csv", help="one row per run (default: sweep.csv)")
    sweep.add_argument("--sweep-png", default=None,
                       help="throughput against latency with the Pareto frontiers (default: sweep.png when matplotlib is installed)")
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
    return run_command(lambda: _dispatch(args))


def _dispatch(args: argparse.Namespace) -> int:
    check_args(args)  # everything cheap first: no folder made, no model written, no child run
    if args.offload_dir is not None:
        return _command(args, Path(args.offload_dir))
    with tempfile.TemporaryDirectory(prefix="flexgen-bench-") as folder:  # removed however the bench ends
        return _command(args, Path(folder))


def _command(args: argparse.Namespace, offload: Path) -> int:
    if args.ranks:
        return _scaling(args, offload)
    return _sweep(args, offload) if args.sweep else _compare(args, offload)


def _say(text: str) -> None:
    """Progress, as it happens (stderr, flushed): a long bench is never silent."""
    print(text, file=sys.stderr, flush=True)


def _model_dir(args: argparse.Namespace, offload: Path) -> Path:
    if args.shape:  # known: check_args
        from .checkpoints import make_random_checkpoint

        path = offload / f"checkpoint-{args.shape}-{args.checkpoint_dtype}"
        _say(f"checkpoint: random {args.shape} weights in {args.checkpoint_dtype} in {path} (written once, then reused)")
        return make_random_checkpoint(args.shape, path, dtype=args.checkpoint_dtype)
    return Path(args.model or DEFAULT_MODEL)


def _workload(args: argparse.Namespace, offload: Path):
    from .compare import Workload

    ours_args = checks.ours_flags(args.ours_flags)
    mem_limit, budget = checks.memory(args)
    return Workload(_model_dir(args, offload), args.prompt_len, args.gen_len, mem_limit, budget, offload,
                    ours_args=ours_args)


def _bounds(args: argparse.Namespace, w):
    """The bound models, one per compute dtype, each built (and said) when a run first needs it."""
    from .bound import BoundModels, build_bound_model

    def build(compute_dtype):
        return build_bound_model(w.model_dir, prompt_len=w.prompt_len, gen_len=w.gen_len, offload_dir=w.offload_dir,
                                 hardware=args.hardware, compute_dtype=compute_dtype)

    return BoundModels(build, on_build=lambda dtype, model: _say(
        f"bound ({model.dtypes.compute}): cost model with the speeds of {model.hardware_source}"))


def _dtypes(args: argparse.Namespace, w, systems: list[str]) -> dict[str, list]:
    """The compute dtypes each of `systems` runs in: as --baseline-dtypes / --ours-dtypes list them,
    else those this machine computes well, measured now on the compute device (bound.py)."""
    from .bound import DTYPES, bench_shapes, choose_dtypes, describe_dtypes, measure_matmul_rates
    from ..spec.model import ModelSpec

    baseline, ours = checks.dtype_lists(args)
    need = (baseline is None and any(s != "ours" for s in systems)) or (ours is None and "ours" in systems)
    if need:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        shapes = bench_shapes(ModelSpec.from_dir(w.model_dir).hidden_size, w.prompt_len)
        rates = measure_matmul_rates(DTYPES, shapes, device=device)
        choice = choose_dtypes(rates, shapes)
        _say(describe_dtypes(rates, shapes, choice, device))
        measured = list(choice.run)
        baseline, ours = baseline or measured, ours or measured
    return {system: (ours if system == "ours" else baseline) for system in systems}


def _header(args: argparse.Namespace, w, bounds, dtypes: dict[str, list]) -> str:
    sources = "; ".join(f"{m.dtypes.compute}: {m.hardware.name}, from {m.hardware_source}" for m in bounds.built.values())
    return (f"machine: {platform.machine()}, {os.cpu_count()} cores; model {args.shape or w.model_dir.name}; "
            f"prompt {w.prompt_len}, gen {w.gen_len}; memory cap {format_size(w.mem_limit) if w.mem_limit else 'none'}, "
            f"budget {format_size(w.budget) if w.budget else 'none'}\n"
            f"compute dtypes: " + "; ".join(f"{s} {','.join(d or 'default' for d in ds)}" for s, ds in dtypes.items())
            + f"\nbounds: {sources or 'none computed'}")


def _compare(args: argparse.Namespace, offload: Path) -> int:
    from .compare import IN_MEMORY, best_baseline, best_ours, in_memory_run, offload_ratio, run_ours
    from .report import format_attempt, format_summary, format_table

    systems = checks.systems(args.systems)
    blocks = checks.blocks(args.blocks or COMPARE_BLOCKS)
    batches = checks.int_list(args.batches, "--batches")
    w = _workload(args, offload)
    dtypes = _dtypes(args, w, systems)
    bounds = _bounds(args, w)
    show = lambda a: _say(format_attempt(a))  # noqa: E731
    best, attempts = {}, {}
    for system in systems:
        attempts[system], best[system] = [], None
        for dtype in dtypes[system]:
            if system == "ours":
                # Without a --budget of the user's, also as a user runs it: the planner sizes block and
                # placement under the cap, for as many prompts as the baselines' largest batch.
                auto = None if args.budget else max(batches)
                _say(f"ours {dtype}: blocks {', '.join(f'{g}x{n}' for g, n in blocks)} while they fit the budget"
                     + (f", then the planner's own choice for {auto} prompts" if auto else ""))
                found, tried = best_ours(w, blocks, bounds, dtype=dtype, auto_prompts=auto, on_attempt=show)
            else:
                _say(f"{system} {dtype}: batches {', '.join(map(str, sorted(set(batches))))} while they fit")
                found, tried = best_baseline(system, w, batches, dtype=dtype, on_attempt=show)
            attempts[system] += tried
            if found is not None and (best[system] is None or found.tokens_per_s > best[system].tokens_per_s):
                best[system] = found
    ratio_line = "offloaded decode / in-memory decode: not measured (no run of ours succeeded)"
    if best.get("ours") is not None:
        p = best["ours"].result["policy_fields"]
        block = (p["gpu_batch_size"], p["num_gpu_batches"])
        dtype = best["ours"].dtype or None
        run, note = in_memory_run(w, block, bounds.for_dtype(dtype), compute_dtype=dtype)
        _say(f"{IN_MEMORY}: block {block[0]}x{block[1]} in {dtype or 'the default dtype'} with everything in memory, "
             f"{note}")
        in_memory = run_ours(w, run, bounds)
        show(in_memory)
        best[IN_MEMORY], attempts[IN_MEMORY] = (in_memory if in_memory.ok else None), [in_memory]
        ratio = offload_ratio(best["ours"], in_memory)
        if ratio is None:
            ratio_line = f"offloaded decode / in-memory decode: not measured (the in-memory run failed: {in_memory.error})"
        else:
            ratio_line = (f"offloaded decode / in-memory decode = {ratio:.2f} (block {block[0]}x{block[1]}, {dtype}: "
                          f"{best['ours'].result['decode_tokens_per_s']:.2f} / {in_memory.result['decode_tokens_per_s']:.2f} "
                          f"tok/s; the in-memory run had {note})")
            if all(p[f"{kind}_gpu_percent"] >= 100 for kind in ("w", "cache", "act")):
                ratio_line += "; the offloaded run had everything in memory too: the ratio is run-to-run noise"
    print(_header(args, w, bounds, dtypes))
    print(format_table(args.shape or w.model_dir.name, best, attempts))
    print(ratio_line)
    print(format_summary(attempts, prompt_len=w.prompt_len, gen_len=w.gen_len,
                         cap=format_size(w.mem_limit) if w.mem_limit else "none"), flush=True)
    if args.json:
        data = {s: [a.to_dict() for a in runs] for s, runs in attempts.items()}
        data["hardware"] = {m.dtypes.compute: m.hardware_source for m in bounds.built.values()}
        data["dtypes"] = dtypes
        write_json_file(args.json, data, flag="--json")
    return 0


def _sweep(args: argparse.Namespace, offload: Path) -> int:
    from .report import format_attempt, format_sweep_table
    from .sweep import (MISSING, frontier_by_system, grid_runs, parse_placements, planner_points, plot_sweep,
                        require_matplotlib, run_flags, run_sweep, write_csv)

    png = args.sweep_png
    if not png:  # given: check_args found matplotlib
        try:
            require_matplotlib()
            png = "sweep.png"
        except UserError:
            _say(f"no chart: {MISSING}")
    systems = checks.systems(args.systems)
    blocks, placements = checks.blocks(args.blocks or SWEEP_BLOCKS), parse_placements(args.placements)
    latencies = []
    if args.max_latencies:
        try:
            latencies = [float(x) for x in args.max_latencies.split(",") if x.strip()]
            assert latencies and min(latencies) > 0
        except (ValueError, AssertionError):
            raise UserError(f"--max-latencies {args.max_latencies!r} must be comma-separated seconds > 0, e.g. 10,60") from None
    planner = planner_points(latencies, run_flags())
    batches = checks.int_list(args.batches, "--batches")
    w = _workload(args, offload)
    dtypes = _dtypes(args, w, systems)
    groups = grid_runs(blocks, placements, dtypes.get("ours", [None]))
    bounds = _bounds(args, w)
    count = sum(map(len, groups)) + len(planner) if "ours" in systems else 0
    _say(f"sweep: up to {count} runs of ours, then {', '.join(s for s in systems if s != 'ours') or 'no baselines'} "
         f"at batches {args.batches} while they fit")
    rows = run_sweep(w, groups, planner, systems, batches, bounds, dtypes=dtypes,
                     on_attempt=lambda a: _say(format_attempt(a)))
    write_csv(rows, args.sweep_csv)
    frontier = frontier_by_system(rows)
    print(_header(args, w, bounds, dtypes))
    print(format_sweep_table(rows, frontier))
    print(f"* = on its system's Pareto frontier; latency = one block, prefill to last token. CSV: {args.sweep_csv}")
    if png:
        plot_sweep(rows, png, title=f"{args.shape or w.model_dir.name}, prompt {w.prompt_len}, gen {w.gen_len}, "
                                    f"cap {format_size(w.mem_limit) if w.mem_limit else 'none'}")
        print(f"chart: {png}", flush=True)
    if args.json:
        write_json_file(args.json, {"hardware": {m.dtypes.compute: m.hardware_source for m in bounds.built.values()},
                                    "dtypes": dtypes, "runs": [a.to_dict() for a in rows]}, flag="--json")
    return 0


def _scaling(args: argparse.Namespace, offload: Path) -> int:
    from .report import format_scaling_table
    from .runs import run_ranks

    ranks = checks.int_list(args.ranks, "--ranks")
    block = args.gpu_batch_size * args.num_gpu_batches
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
    print(format_scaling_table(runs))
    if args.json:
        write_json_file(args.json, [r.__dict__ for r in runs], flag="--json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
