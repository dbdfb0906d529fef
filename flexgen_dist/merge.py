"""`python -m flexgen_dist.merge --input prompts.jsonl results.jsonl [SHARD_OUTPUT ...]`: join the
outputs of `--shard I/N` runs into one file in input order.

Without shard files it takes `results.shard-*-of-N.jsonl` next to `results.jsonl` and checks that
all N are there. Shard files may also be named (or given as one quoted glob). The input file gives
the order; every id of the input must be in exactly one shard output, and every line of the
shard outputs must answer an id of the input. The merged file is written whole or not at all.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

from .frontend.oneline import OneLineParser
from .errors import UserError
from .frontend.jobfiles import JobFileScanner
from .files import atomic_output
from .frontend.outpath import check_output_path
from .frontend.output_rows import row_key
from .frontend.shards import find_shard_outputs


def merge_shards(input_path: str | Path, output_path: str | Path, shard_paths: list[str | Path], *,
                 overwrite: bool = False) -> int:
    """Write `output_path` from the shard outputs in the order of `input_path`; return the number
    of lines. Raises UserError (one line, naming file and line) on a missing, repeated or foreign id."""
    output = os.fspath(output_path)
    if output == "-":
        raise UserError("merge writes a file; give an output path, not -")
    check_output_path(output, input_path=input_path, flag="the merge output")
    if os.path.exists(output) and not overwrite:
        raise UserError(f"{output!r} already exists; pass --overwrite to replace it")
    if not shard_paths:
        raise UserError("no shard outputs to merge")
    for shard in shard_paths:
        if os.path.exists(output) and os.path.samefile(shard, output):
            raise UserError(f"{str(shard)!r} is both a shard and the merge output; choose another output")
    index, files = _index_shards([Path(p) for p in shard_paths])
    try:
        count = 0
        with atomic_output(output) as out:
            for request in JobFileScanner(input_path):
                where = index.pop(request.key, None)
                if where is None:
                    raise UserError(f"{request.where}: id {request.key} has no result in the shard outputs; "
                                    f"is a shard unfinished? Rerun it (same command) and merge again")
                file_idx, offset, length = where
                out.write(os.pread(files[file_idx][1], length, offset))
                count += 1
            if index:
                key, (file_idx, offset, _) = min(index.items(), key=lambda item: item[1])
                line_no = _line_at(files[file_idx][1], offset)
                raise UserError(f"{files[file_idx][0]}:{line_no}: id {key} is not in {os.fspath(input_path)!r}; the "
                                f"shards were made from another input file ({len(index)} such ids)")
        return count
    finally:
        for _, fd in files:
            os.close(fd)


def _index_shards(paths: list[Path]) -> tuple[dict[str, tuple[int, int, int]], list[tuple[str, int]]]:
    """id key -> (file, offset, length) of its line; one pass over each shard output."""
    index: dict[str, tuple[int, int, int]] = {}
    lines_of: dict[str, tuple[int, int]] = {}  # id key -> (file, line) for messages
    files: list[tuple[str, int]] = []
    try:
        for file_idx, path in enumerate(paths):
            if not path.is_file():
                raise UserError(f"shard output {str(path)!r} does not exist or is not a file")
            files.append((str(path), os.open(path, os.O_RDONLY)))
            offset = 0
            with open(path, "rb") as f:
                for line_no, raw in enumerate(f, start=1):
                    where = f"{path}:{line_no}"
                    if not raw.endswith(b"\n"):
                        raise UserError(f"{where}: the last line is cut short; this is not a finished shard output")
                    try:
                        key = row_key(json.loads(raw))
                    except (ValueError, KeyError, TypeError):
                        raise UserError(f"{where}: not an output line with an 'id' or 'custom_id'") from None
                    if key in index:
                        other_file, other_line = lines_of[key]
                        raise UserError(f"{where}: id {key} is also in {paths[other_file]}:{other_line}; "
                                        f"each id must come from one shard (were shards run with different N?)")
                    index[key] = (file_idx, offset, len(raw))
                    lines_of[key] = (file_idx, line_no)
                    offset += len(raw)
    except BaseException:
        for _, fd in files:
            os.close(fd)
        raise
    return index, files


def _line_at(fd: int, offset: int) -> int:
    return os.pread(fd, offset, 0).count(b"\n") + 1


def _expand(patterns: list[str]) -> list[str]:
    """Shard files as given; a pattern that names no file is expanded (a quoted glob)."""
    paths: list[str] = []
    for pattern in patterns:
        if not os.path.exists(pattern) and glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise UserError(f"no file matches {pattern!r}")
            paths.extend(matches)
        else:
            paths.append(pattern)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m flexgen_dist.merge", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="the job file the shards were run on (gives the order)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing merged output")
    parser.add_argument("output", help="the merged output (the --output the shard runs were given)")
    parser.add_argument("shards", nargs="*", help="shard outputs (default: OUTPUT's .shard-I-of-N files)")
    args = parser.parse_args(argv)
    try:
        shards = _expand(args.shards) if args.shards else [str(p) for p in find_shard_outputs(args.output)]
        count = merge_shards(args.input, args.output, shards, overwrite=args.overwrite)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"merged {count} results from {len(shards)} shard outputs into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
