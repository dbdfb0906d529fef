"""Where results go: checks on `--output` (and the other files a run writes) before any work.

`check_output_path` refuses a folder, a device, a FIFO, a socket or a symbolic link at the
output path (or at the progress files beside it), a missing or read-only folder, and the input
file itself. `-` is standard output and is always accepted. The files themselves are written by
`flexgen_dist.files` (whole or not at all, never through a link).

Side files, the files a run writes beside its results (`--trace`, `--stats-json`): they are checked with `--output`'s rules (`outpath.check_output_path`) before any work, so a
typo in a folder name fails in a second instead of after the run (and before the output exists),
and each must be a path of its own: not the input, not the output or its progress files, not
the other side file. They are written whole or not at all (`files.atomic_output`): a full disk
at the end raises `EnvironmentFailure` and leaves no half-written file; a link planted at the
name is replaced, never followed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EnvironmentFailure, UserError
from ..files import atomic_output, describe_kind
from .identity import progress_paths

if TYPE_CHECKING:  # the job-file layer runs without torch (the configuration holds the runtime)
    from .config import JobConfig

STDOUT = "-"


def check_output_path(path: str | os.PathLike, *, input_path: str | os.PathLike | None = None,
                      companions: tuple[str, ...] = (), flag: str = "--output", allow_stdout: bool = True) -> None:
    """Fail before the job runs, not after hours of work, and never write over something that is
    not a plain file. `companions` are further files the run will create next to the output (its
    progress files); they get the same checks. `allow_stdout=False`: a file it must be (`-` is
    refused), e.g. a trace beside results that go to standard output."""
    text = os.fspath(path)
    or_stdout = ", or - for standard output" if allow_stdout else ""
    if text == STDOUT:
        if allow_stdout:
            return
        raise UserError(f"{flag} -: standard output is not possible here; give a file name")
    if not text:
        raise UserError(f"{flag} is empty; give a file name{or_stdout}")
    if text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        raise UserError(f"{flag} {text!r} names a folder; give a file name inside it, e.g. {text}results.jsonl")
    target = Path(text)
    for candidate in (target, *(Path(c) for c in companions)):
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            what = "" if candidate == target else f": the progress file {str(candidate)!r}"
            raise UserError(
                f"{flag} {text!r}{what} is {describe_kind(mode)}; refusing to write there: "
                f"give the path of a regular file{or_stdout}"
            )
    parent = target.absolute().parent
    if not parent.is_dir():
        raise UserError(f"cannot write {flag} {text!r}: folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {flag} {text!r}: folder {str(parent)!r} is not writable; choose another folder")
    for candidate in (target, *(Path(c) for c in companions)):
        why = _cannot_replace(candidate, parent)
        if why:
            what = "" if candidate == target else f": the progress file {str(candidate)!r}"
            raise UserError(f"cannot write {flag} {text!r}{what}: {why}")
    if input_path is not None and target.exists():
        with contextlib.suppress(OSError):
            if os.path.samefile(target, input_path):
                raise UserError(f"{flag} {text!r} is the input file; choose another output file")


_FS_IOC_GETFLAGS = 0x80086601  # Linux: the inode flags that chattr sets
_IMMUTABLE, _APPEND_ONLY = 0x10, 0x20


def _cannot_replace(path: Path, parent: Path) -> str | None:
    """Why the run could not replace an existing file at `path` (files.atomic_output renames a
    new file over it at the end, after all the work), or None. Permission bits do not matter
    for a rename; an immutable or append-only file, and another user's file in a sticky folder
    (such as /tmp), cannot be replaced, even by root for the first."""
    try:
        st = os.lstat(path)
    except OSError:
        return None  # absent: created, which the folder check covers
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except (ImportError, OSError):
        fd = None
    if fd is not None:
        try:
            flags = struct.unpack("l", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
        except OSError:  # a file system without inode flags
            flags = 0
        finally:
            os.close(fd)
        if flags & (_IMMUTABLE | _APPEND_ONLY):
            kind = "immutable" if flags & _IMMUTABLE else "append-only"
            return (f"{str(path)!r} is {kind} (chattr +{'i' if flags & _IMMUTABLE else 'a'}), so it cannot be "
                    f"replaced; clear that with chattr -{'i' if flags & _IMMUTABLE else 'a'}, or choose another file")
    euid = os.geteuid() if hasattr(os, "geteuid") else 0
    folder = os.stat(parent)
    if folder.st_mode & stat.S_ISVTX and euid not in (0, st.st_uid, folder.st_uid):
        return (f"{str(path)!r} belongs to another user in a sticky folder ({str(parent)!r}), so it cannot be "
                f"replaced; choose another file")
    return None


def trace_path(trace: str, rank: int) -> str:
    """Rank 0 writes `--trace FILE.json` itself; rank r > 0 writes FILE.rank<r>.json beside it."""
    if rank == 0 or not trace:
        return trace
    path = Path(trace)
    return str(path.with_suffix(f".rank{rank}{path.suffix}"))


def side_files(config: JobConfig, world_size: int) -> list[tuple[str, str]]:
    """(flag, path) of every side file the run's ranks will write."""
    files = []
    if config.trace is not None:
        files += [("--trace", trace_path(config.trace, rank)) for rank in range(world_size)]
    if config.stats_json is not None:
        files.append(("--stats-json", config.stats_json))
    return files


def check_side_files(config: JobConfig, *, output: str | None, world_size: int) -> None:
    """Refuse, before anything is read or written, a side file that cannot be written or that
    names a file the run reads or writes for another purpose. Every rank checks every rank's
    files, so all ranks stop on the same error (only rank 0 prints it)."""
    taken: list[tuple[str, str]] = []
    if config.input is not None:
        taken.append(("the --input file", config.input))
    if output is not None and output != STDOUT:
        partial, record = progress_paths(output)
        taken += [("the --output file", output), ("the output's progress file", str(partial)),
                  ("the output's run record", str(record))]
    for flag, path in side_files(config, world_size):
        check_output_path(path, input_path=config.input, flag=flag, allow_stdout=False)
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
