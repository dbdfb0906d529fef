"""Shards: one input file split over independent runs (`--shard I/N`, or a SLURM array job).

Shard I of N takes the requests whose 0-based position in the file is I mod N (round robin).
Why not contiguous ranges: round robin needs no count of the file before the first request is
picked (one streaming pass), and it gives every shard the same mix of the file even when the file
is sorted (by length, by topic), so shards finish at about the same time. It depends on nothing
but the input: a rerun, another machine or another N-way launcher picks the same requests.

Each shard writes its own resumable output, `results.shard-I-of-N.jsonl` for `--output
results.jsonl`; `python -m flexgen_dist.merge` joins them in input order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import UserError
from .resume import progress_paths

SHARD_NAME = re.compile(r"\.shard-(?P<index>\d+)-of-(?P<count>\d+)")


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"a shard needs 0 <= index < count, got {self.index}/{self.count}")

    def selects(self, request_index: int) -> bool:
        return request_index % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | None, environ: Mapping[str, str]) -> Shard:
    """`--shard I/N` (0 <= I < N) if given, else the SLURM array task of this job, else the whole
    file. `--shard 0/1` runs the whole file even inside an array job (an array used for
    something else, e.g. one model per task)."""
    if text is not None:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise UserError(f"--shard {text!r}: expected I/N with whole numbers, e.g. 0/4 for the first of four shards")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or index >= count:
            raise UserError(f"--shard {text!r}: the index counts from 0 and must be below N (0/{max(count, 1)} .. "
                            f"{max(count, 1) - 1}/{max(count, 1)})")
        return Shard(index=index, count=count)
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return Shard(index=0, count=1)
    return _slurm_array_shard(environ)


def _slurm_array_shard(environ: Mapping[str, str]) -> Shard:
    def read(name: str, default: int | None = None) -> int:
        value = environ.get(name)
        if value is None:
            if default is None:
                raise UserError(f"SLURM_ARRAY_TASK_ID is set but {name} is not; pass --shard I/N")
            return default
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{name}={value!r} is not a whole number; pass --shard I/N") from None

    task_id = read("SLURM_ARRAY_TASK_ID")
    count = read("SLURM_ARRAY_TASK_COUNT")
    first = read("SLURM_ARRAY_TASK_MIN", 0)
    last = read("SLURM_ARRAY_TASK_MAX", first + count - 1)
    step = read("SLURM_ARRAY_TASK_STEP", 1)
    if step != 1 or last - first + 1 != count:
        raise UserError(
            f"SLURM array ids {first}..{last} (step {step}) are not {count} consecutive numbers; submit with "
            f"--array=0-{count - 1} (a %limit is fine), or pass --shard I/N"
        )
    index = task_id - first
    if not 0 <= index < count:
        raise UserError(f"SLURM_ARRAY_TASK_ID={task_id} is outside {first}..{last}; pass --shard I/N")
    return Shard(index=index, count=count)


def shard_output_path(output: str, shard: Shard) -> str:
    """`results.jsonl` -> `results.shard-2-of-4.jsonl`; the whole file keeps the name as given."""
    if shard.count == 1 or output == "-":
        return output
    path = Path(output)
    return str(path.with_name(f"{path.stem}.shard-{shard.index}-of-{shard.count}{path.suffix}"))


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
