"""The files a run writes beside its results: `--trace` and `--stats-json`.

They are checked with `--output`'s rules (`outpath.check_output_path`) before any work, so a
typo in a folder name fails in a second instead of after the run (and before the output exists),
and each must be a path of its own: not the input, not the output or its progress files, not
the other side file. They are written whole or not at all (`files.atomic_output`): a full disk
at the end raises `EnvironmentFailure` and leaves no half-written file; a link planted at the
name is replaced, never followed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from ..errors import EnvironmentFailure, UserError
from ..files import atomic_output
from .outpath import STDOUT, check_output_path
from .resume import progress_paths


def trace_path(trace: str, rank: int) -> str:
    """Rank 0 writes `--trace FILE.json` itself; rank r > 0 writes FILE.rank<r>.json beside it."""
    if rank == 0 or not trace:
        return trace
    path = Path(trace)
    return str(path.with_suffix(f".rank{rank}{path.suffix}"))


def side_files(args: argparse.Namespace, world_size: int) -> list[tuple[str, str]]:
    """(flag, path) of every side file the run's ranks will write."""
    files = []
    if args.trace is not None:
        files += [("--trace", trace_path(args.trace, rank)) for rank in range(world_size)]
    if args.stats_json is not None:
        files.append(("--stats-json", args.stats_json))
    return files


def check_side_files(args: argparse.Namespace, *, output: str | None, world_size: int) -> None:
    """Refuse, before anything is read or written, a side file that cannot be written or that
    names a file the run reads or writes for another purpose. Every rank checks every rank's
    files, so all ranks stop on the same error (only rank 0 prints it)."""
    taken: list[tuple[str, str]] = []
    if args.input is not None:
        taken.append(("the --input file", args.input))
    if output is not None and output != STDOUT:
        partial, record = progress_paths(output)
        taken += [("the --output file", output), ("the output's progress file", str(partial)),
                  ("the output's run record", str(record))]
    for flag, path in side_files(args, world_size):
        check_output_path(path, input_path=args.input, flag=flag, allow_stdout=False)
        for what, other in taken:
            if same_file(path, other):
                raise UserError(f"{flag} {path!r} is {what}; give {flag} a file of its own")
        taken.append((f"the {flag} file", path))


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same path once links in folders are resolved, or
    (both existing) the same inode, e.g. a hard link."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def write_json_file(path: str | os.PathLike, data: object, *, flag: str, indent: int | None = 1) -> None:
    """`data` as JSON at `path`, whole or not at all; a failing disk is an `EnvironmentFailure`."""
    text = json.dumps(data, indent=indent, default=str) + "\n"
    try:
        with atomic_output(path) as f:
            f.write(text.encode())
    except OSError as exc:
        raise EnvironmentFailure(f"cannot write {flag} {os.fspath(path)!r}: {exc.strerror or exc}; free space "
                                 f"or choose another {flag} path") from None


def stats_record(stats, policy, world_size: int, plan=None) -> dict:
    """Machine-readable run statistics (what benchmarks parse), with the plan's prediction and
    this process's memory (peak resident set, and what it held when the plan was made)."""
    data = {
        "world_size": world_size,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "total_s": stats.total_s,
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "prefill_tokens_per_s": stats.prefill_tokens_per_s,
        "decode_tokens_per_s": stats.decode_tokens_per_s,
        "tokens_per_s": stats.tokens_per_s,
        "padding_efficiency": stats.padding_efficiency if stats.prompt_slots else None,
        "row_steps": stats.row_steps,
        "row_utilization": stats.row_utilization if stats.row_steps else None,
        "policy": dataclasses.asdict(policy),
    }
    if plan is not None:
        import resource

        data["planned"] = {
            "searched": plan.searched,
            "tokens_per_s": plan.estimate.throughput,
            "prefill_s": plan.estimate.prefill_s,
            "decode_s": plan.estimate.decode_s,
            "bytes_per_tier": {str(tier): n for tier, n in plan.placement.bytes_per_tier().items()},
            "process_rss_at_plan": plan.process_rss,
            "peak_rss": plan.predicted_peak_rss,
            "dtypes": dataclasses.asdict(plan.placement.dtypes),
            "workload": dataclasses.asdict(plan.placement.workload),
            "buffers": dataclasses.asdict(plan.placement.buffers),
            "hardware": plan.hardware.name,
        }
        data["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return data
