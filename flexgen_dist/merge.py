"""`python -m flexgen_dist.merge --input prompts.jsonl results.jsonl [SHARD_OUTPUT ...]`: join the
outputs of `--shard I/N` runs into one file in input order.

Without shard files it takes `results.shard-*-of-N.jsonl` next to `results.jsonl` and checks that
all N are there. Shard files may also be named (or given as one quoted glob). The input file gives
the order; every id of the input must be in exactly one shard output, and every line of the
shard outputs must answer an id of the input. The merged file is written whole or not at all.

Provenance: a shard run records which run made its output (`OUT.made-by.json`: the model's
fingerprint, the input file's hash, the generation settings, the output format, the shard). Shards
that other runs made (another model, other settings, another version of the input) are refused,
naming the two shards and the first thing that differs. Shards without such a record (written by
hand, or by an older version) are merged on their ids alone, but never mixed with recorded ones.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
from pathlib import Path

from .cli.shell import OneLineParser
from .cli.shell import run_command
from .errors import UserError
from .files import atomic_output
from .jobs.inputs import JobFileScanner
from .jobs.outputs import check_output_path, progress_paths, provenance_path, read_run_record, row_key
from .jobs.requests import Shard, shard_output_path

SHARD_NAME = re.compile(r"\.shard-(?P<index>\d+)-of-(?P<count>\d+)")


def merge_shards(input_path: str | Path, output_path: str | Path, shard_paths: list[str | Path], *,
                 overwrite: bool = False) -> int:
    """Write `output_path` from the shard outputs in the order of `input_path`; return the number
    of lines. Raises UserError (one line, naming file and line) on a missing, repeated or foreign id."""
    return merge(input_path, output_path, shard_paths, overwrite=overwrite)[0]


def merge(input_path: str | Path, output_path: str | Path, shard_paths: list[str | Path], *,
          overwrite: bool = False) -> tuple[int, bool]:
    """`merge_shards`, and whether the output was there already: an existing output that holds
    exactly this merge (the same command run again) is left as it is; any other existing file
    is refused without `overwrite`."""
    output = os.fspath(output_path)
    if output == "-":
        raise UserError("merge writes a file; give an output path, not -")
    check_output_path(output, input_path=input_path, flag="the merge output")
    if not shard_paths:
        raise UserError("no shard outputs to merge")
    exists = os.path.exists(output)
    for shard in shard_paths:
        if exists and os.path.samefile(shard, output):
            raise UserError(f"{str(shard)!r} is both a shard and the merge output; choose another output")
    check_provenance(input_path, [Path(p) for p in shard_paths])
    index, files = _index_shards([Path(p) for p in shard_paths])
    try:
        if exists and not overwrite:
            digest, count = hashlib.sha256(), 0
            for line in _merged_lines(input_path, index, files):
                digest.update(line)
                count += 1
            if digest.hexdigest() != _sha256(output):
                raise UserError(f"{output!r} already exists and is not the merge of these shards; pass --overwrite "
                                f"to replace it")
            return count, True
        count = 0
        with atomic_output(output) as out:
            for line in _merged_lines(input_path, index, files):
                out.write(line)
                count += 1
        return count, False
    finally:
        for _, fd in files:
            os.close(fd)


def _merged_lines(input_path, index: dict[str, tuple[int, int, int]], files: list[tuple[str, int]]):
    """The shards' lines in input order; every id of the input answered once, none other."""
    for request in JobFileScanner(input_path):
        where = index.pop(request.key, None)
        if where is None:
            raise UserError(f"{request.where}: id {request.key} has no result in the shard outputs; "
                            f"is a shard unfinished? Rerun it (same command) and merge again")
        file_idx, offset, length = where
        yield os.pread(files[file_idx][1], length, offset)
    if index:
        key, (file_idx, offset, _) = min(index.items(), key=lambda item: item[1])
        line_no = _line_at(files[file_idx][1], offset)
        raise UserError(f"{files[file_idx][0]}:{line_no}: id {key} is not in {os.fspath(input_path)!r}; the "
                        f"shards were made from another input file ({len(index)} such ids)")


def check_provenance(input_path: str | Path, shards: list[Path]) -> None:
    """Refuse shards made by different runs, or from another version of the input (one line
    naming the shards and the first field that differs)."""
    fix = "rerun that shard (the same command with --overwrite) and merge again"
    records = [(path, read_run_record(provenance_path(path), fix=fix)) for path in shards]
    made = [(path, record) for path, record in records if record is not None]
    if not made:
        return  # no shard says which run made it: the ids alone are checked
    first_path, first = made[0]
    for path, record in records:
        if record is None:
            raise UserError(f"{path} has no record of the run that made it ({provenance_path(path).name}) but "
                            f"{first_path} has; rerun {path} with the command of the other shards and merge again")
        difference = _first_difference(first, record)
        if difference:
            raise UserError(f"{path} and {first_path} were made by different runs: {difference}; rerun the odd shard "
                            f"with the model and settings of the others (--overwrite) and merge again")
    input_sha256 = _sha256(input_path)
    if input_sha256 is not None and first["input_sha256"] != input_sha256:
        raise UserError(f"the shards were made from another version of {os.fspath(input_path)!r} (its content "
                        f"changed since {first_path} was made); merge with the file they ran on, or rerun the "
                        f"shards (--overwrite) on this one")


def _first_difference(a: dict, b: dict) -> str | None:
    if a["model"] != b["model"]:
        return "the model differs (its weights, config, tokenizer, dtypes or compression)"
    for name in sorted(set(a["settings"]) | set(b["settings"])):
        if a["settings"].get(name) != b["settings"].get(name):
            return (f"the generation setting {name} differs ({json.dumps(b['settings'].get(name))} against "
                    f"{json.dumps(a['settings'].get(name))})")
    if a["output_format"] != b["output_format"]:
        return f"the output format differs ({b['output_format']} against {a['output_format']})"
    if a["shard"].partition("/")[2] != b["shard"].partition("/")[2]:
        return f"the shard count differs ({b['shard']} against {a['shard']})"
    if a["input_sha256"] != b["input_sha256"]:
        return "the input file's content differs (they ran on different versions of it)"
    return None


def _sha256(path: str | Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None  # the input's own checks say what is wrong with it
    return digest.hexdigest()


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


def find_shard_outputs(output: str) -> list[Path]:
    """The shard outputs of `--output output`, in shard order, checked to be all there and of one
    count; a missing one is named, with a hint when it is still unfinished."""
    path = Path(output)
    pattern = f"{path.stem}.shard-*-of-*{path.suffix}"
    found: dict[int, set[int]] = {}
    for candidate in path.absolute().parent.glob(pattern):
        match = SHARD_NAME.fullmatch(candidate.name[len(path.stem):len(candidate.name) - len(path.suffix)])
        if match:
            found.setdefault(int(match.group("count")), set()).add(int(match.group("index")))
    if not found:
        raise UserError(f"no shard outputs {pattern!r} next to {output!r}; run the shards first, or name the files")
    if len(found) > 1:
        counts = ", ".join(f"of-{count}" for count in sorted(found))
        raise UserError(f"shard outputs for several shard counts ({counts}) next to {output!r}; name the files to merge")
    (count, indices), = found.items()
    for index in range(count):
        if index not in indices:
            missing = shard_output_path(output, Shard(index=index, count=count))
            unfinished = progress_paths(missing)[0].exists()
            raise UserError(f"shard {index}/{count} output {missing!r} is missing"
                            f"{' (still unfinished: rerun that shard to complete it)' if unfinished else ''}")
    return [Path(shard_output_path(output, Shard(index=index, count=count))) for index in range(count)]


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

    def body() -> int:
        try:
            shards = _expand(args.shards) if args.shards else [str(p) for p in find_shard_outputs(args.output)]
            count, already = merge(args.input, args.output, shards, overwrite=args.overwrite)
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if already:
            print(f"already complete: {count} results in {args.output}")
        else:
            print(f"merged {count} results from {len(shards)} shard outputs into {args.output}")
        return 0

    return run_command(body)  # one-line errors; standard output guarded (closed, broken, full)


if __name__ == "__main__":
    sys.exit(main())
