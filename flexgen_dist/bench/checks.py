"""The bench's flags, checked before anything runs: a bench takes minutes to hours, and a typo
found by a child process (or when the results are written) wastes all of it. Nothing here
writes a file or makes a folder but `--offload-dir` itself (created if missing, as it would be)."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..files import check_offload_folder
from ..jobs.outputs import check_output_path
from ..sizes import parse_size

PROCESS_RESERVE = int(1.5 * 2**30)  # what a run's own process takes besides the weights and cache it is given
WORKLOADS = {  # --workload: (prompt tokens, new tokens)
    "short": (64, 16),  # prefill weighs as much as decoding
    "decode-heavy": (64, 128),  # decoding dominates: where offloading's cost per step shows
}


def workload(args: argparse.Namespace) -> None:
    """--prompt-len and --gen-len from --workload where not given (sets them on `args`)."""
    if args.workload not in WORKLOADS:
        raise UserError(f"unknown --workload {args.workload!r}; use {', '.join(WORKLOADS)}")
    prompt_len, gen_len = WORKLOADS[args.workload]
    args.prompt_len = prompt_len if args.prompt_len is None else args.prompt_len
    args.gen_len = gen_len if args.gen_len is None else args.gen_len


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} must be comma-separated whole numbers, e.g. 1,2") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} {text!r} must list whole numbers >= 1")
    return values


def blocks(text: str) -> list[tuple[int, int]]:
    try:
        found = [tuple(int(x) for x in b.lower().split("x")) for b in text.split(",") if b.strip()]
        assert found and all(len(b) == 2 and min(b) >= 1 for b in found)
    except (ValueError, AssertionError):
        raise UserError(f"--blocks {text!r} must look like 8x1,32x4 (gpu batch size x gpu batches)") from None
    return found


def systems(text: str) -> list[str]:
    found = [s.strip() for s in text.split(",") if s.strip()]
    unknown = set(found) - {"ours", "transformers", "accelerate"}
    if unknown or not found:
        raise UserError(f"--systems: unknown {', '.join(sorted(unknown)) or 'none given'}; use ours, transformers, accelerate")
    return found


def memory(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """(--mem-limit, the budget: --budget, else the cap less what the process itself needs)."""
    mem_limit = parse_size(args.mem_limit, "--mem-limit") if args.mem_limit else None
    if args.budget:
        budget = parse_size(args.budget, "--budget")
        if budget <= 0:
            raise UserError(f"--budget must be a positive size, got {args.budget!r}")
    else:
        budget = mem_limit - PROCESS_RESERVE if mem_limit else None
    if budget is not None and budget <= 0:
        raise UserError("--mem-limit leaves no budget after 1.5 GiB for the process itself; raise it or give --budget")
    return mem_limit, budget


def ours_flags(text: str) -> tuple[str, ...]:
    """--ours-flags, checked against run's parser now rather than after minutes of baselines."""
    import shlex

    from ..run import build_parser

    flags = tuple(shlex.split(text))
    owned = {"--model", "--prompt-len", "--gen-len", "--seed", "--stats-json", "--offload-dir", "--num-prompts"}
    given = {f.split("=")[0] for f in flags}
    clash = sorted(owned & given)
    if clash:
        raise UserError(f"--ours-flags: {', '.join(clash)} are set by the bench itself; leave them out")
    if "--compute-dtype" in given:
        raise UserError("--ours-flags: give our compute dtypes with --ours-dtypes (e.g. --ours-dtypes float32,bfloat16), "
                        "not --compute-dtype")
    parser = build_parser()
    parser.exit_on_error = False
    try:
        _, unknown = parser.parse_known_args(list(flags))
    except argparse.ArgumentError as exc:
        raise UserError(f"--ours-flags {text!r}: {exc}") from None
    if unknown:
        raise UserError(f"--ours-flags {text!r}: python -m flexgen_dist.run has no {' '.join(unknown)}")
    return flags


def ours_dtype_choices() -> tuple[str, ...]:
    """What run's --compute-dtype takes (auto among them once run has it)."""
    from ..run import build_parser

    action = next(a for a in build_parser()._actions if "--compute-dtype" in a.option_strings)
    return tuple(action.choices)


def dtype_lists(args: argparse.Namespace) -> tuple[list[str] | None, list[str] | None]:
    """(--baseline-dtypes, --ours-dtypes): each the dtypes listed, or None to measure."""
    from .bound import DTYPES, parse_dtypes

    return (parse_dtypes(args.baseline_dtypes, "--baseline-dtypes", DTYPES),
            parse_dtypes(args.ours_dtypes, "--ours-dtypes", ours_dtype_choices()))


def check_args(args: argparse.Namespace) -> None:
    """Every flag a bench mode uses, in the order a user reads them; raises `UserError`."""
    from .checkpoints import SHAPES

    if args.ranks and args.sweep:
        raise UserError("give --ranks (pipeline scaling) or --sweep, not both")
    workload(args)
    if args.model and args.shape:
        raise UserError("give --model or --shape, not both")
    if args.shape and args.shape not in SHAPES:
        raise UserError(f"unknown --shape {args.shape!r}; known: {', '.join(SHAPES)}")
    for flag, value in (("--prompt-len", args.prompt_len), ("--gen-len", args.gen_len)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.ranks:
        int_list(args.ranks, "--ranks")
        for flag, value in (("--gpu-batch-size", args.gpu_batch_size), ("--num-gpu-batches", args.num_gpu_batches),
                            ("--cores", args.cores)):
            if value < 1:
                raise UserError(f"{flag} must be >= 1, got {value}")
    else:
        ours_flags(args.ours_flags)
        systems(args.systems)
        int_list(args.batches, "--batches")
        dtype_lists(args)
        if args.blocks is not None:
            blocks(args.blocks)
        memory(args)
    outputs = [("--json", args.json)]
    if args.sweep:
        from .sweep import parse_placements, require_matplotlib

        parse_placements(args.placements)
        if args.sweep_png:
            require_matplotlib()  # before the sweep, not after it
        outputs += [("--sweep-csv", args.sweep_csv), ("--sweep-png", args.sweep_png)]
    for flag, path in outputs:
        if path is not None:
            check_output_path(path, flag=flag, allow_stdout=False)
    if args.offload_dir is not None:
        check_offload_folder(args.offload_dir)
