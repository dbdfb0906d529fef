"""The ranks of a pipeline agree before they compute.

Every rank reads its own command line and files; activations then cross ranks as raw tensors,
so two ranks started with another checkpoint of the same shape would compute a wrong answer and
exit 0, and two of different shapes or settings would die in the transport ("Received data size
doesn't match") or wait out --comm-timeout. Before planning, each rank states what must match
(`run_record`: the model by content, the input by its hash, the generation settings, the schedule
flags) and `agree` gathers every rank's statement: all ranks refuse together, in one line from
rank 0 naming the first difference and the rank. A rank that could not even state it (its model
folder is missing, its input does not parse) sends its error instead, and rank 0 shows it,
whichever rank it was: the others would otherwise wait for it and say only that it died.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, TypeVar

from ..errors import EnvironmentFailure, UserError, first_line
from .identity import model_file_hashes

T = TypeVar("T")

# Flags that change what ranks send each other or compute; capacities, paths and logging may
# differ per node. (Generation settings, the input and the model are compared as themselves.)
SCHEDULE_FLAGS = ("policy", "percent", "gpu_batch_size", "num_gpu_batches", "max_latency", "stage_layers",
                  "compute_dtype", "cache_dtype", "allow_compression", "compress_weight", "compress_cache",
                  "compress_bits", "compress_group_size", "compress_weight_method", "attn_sparsity", "cpu_cache_compute", "comm_backend",
                  "num_prompts", "prompt_len", "truncate")


class SharedError(UserError):
    """Another rank's mistake (or all ranks'), raised on every rank; rank 0 prints it."""


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_record(*, source, settings: dict, input_sha256: str, shard: str, flags: dict) -> dict[str, str]:
    """What every rank must hold alike, in the order differences are reported: short digests
    (a rank's record crosses the wire) with enough of the value to say what differs."""
    return {
        "model configuration (config.json)": _digest(source.spec.raw),
        "model files (tokenizer, generation config)": _digest(model_file_hashes(Path(source.name))),
        "weights": source.weights.content_digest()[:16],
        "input": input_sha256[:16],
        "shard": shard,
        "generation settings": json.dumps(settings, sort_keys=True),
        **{f"--{name.replace('_', '-')}": json.dumps(value) for name, value in sorted(flags.items())},
    }


def agree(pipeline, start: Callable[[], T], record: Callable[[T], dict[str, str]]) -> T:
    """Every rank calls it: each runs `start` and states `record` of its result (or fails to),
    then all raise together at the first rank that failed or the first field in which a rank
    differs from rank 0; else `start`'s result. With one process, `start()` alone."""
    if pipeline is None or pipeline.world_size == 1:
        return start()
    error: BaseException | None = None
    result = None
    try:
        result = start()
        mine: tuple = ("ok", record(result))
    except (UserError, EnvironmentFailure) as exc:
        error = exc
        mine = ("user" if isinstance(exc, UserError) else "failed", str(exc))
    every = pipeline.gather(mine, what="starting states")
    for rank, (kind, value) in enumerate(every):
        if kind == "ok":
            continue
        if rank == pipeline.rank and rank == 0:
            raise error
        told = f"rank {rank}: {first_line(value)}"
        raise SharedError(told) if kind == "user" else EnvironmentFailure(told)
    first = every[0][1]
    for rank, (_, theirs) in enumerate(every[1:], start=1):
        for field, value in first.items():
            if theirs.get(field) != value:
                raise SharedError(
                    f"the ranks disagree on {field}: rank {rank} has {_shown(theirs.get(field))}, rank 0 "
                    f"{_shown(value)}; start every rank with the same command, model and input files")
    return result


def _shown(value: str | None) -> str:
    return "none" if value is None else value if len(value) <= 60 else value[:57] + "..."
