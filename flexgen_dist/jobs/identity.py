"""A run's identity: what must match for a rerun to continue it, and the records that keep it.

`RunIdentity` (the model's fingerprint, the input's hash, the generation settings, the shard, the
output format) is written as the run record beside an unfinished output (`OUT.run.json`, see
resume.py) and, once the output is finished, with the output's sha256 as its provenance
(`OUT.made-by.json`), which `merge` and a rerun of a finished job read back (`read_run_record`,
every field checked by type).

The model side (`model_fingerprint`): everything that changes what the model outputs.

It covers the files that define the model, by content: config.json, generation_config.json, the
weights index, and the tokenizer's files (MODEL_FILES); the weights (by the weight source's
fingerprint: per file, its name, size and modification time, so a retrained checkpoint saved
over the old one is seen without reading gigabytes); the compute and storage dtypes; and the
policy fields that change results (weight and cache compression, cache dtype, sparse
attention). Nothing else in the folder counts: a job may keep its input, its output and that
output's progress files there (which change as it runs) and still resume. Placement
percentages, batch sizes and the number of ranks are left out: they change where tensors live,
not the tokens (greedy output is exact), so a run may be resumed with a policy that fits better.

The ranks' agreement (`agree`, `run_record`): the ranks of a pipeline agree before they compute.

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

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TYPE_CHECKING, TypeVar

from ..errors import SharedError, UserError
from ..files import open_nofollow
from ..planning.placement import Dtypes
from ..planning.policy import Policy
from .output_rows import row_key

if TYPE_CHECKING:  # the job-file layer runs without torch (the model source needs it)
    from ..api.model_source import ModelSource

# What transformers reads from a model folder to build the model, its generation defaults and
# its tokenizer (fast or sentencepiece, with a chat template in a file of its own or not).
MODEL_FILES = re.compile(
    r"(config|generation_config|model\.safetensors\.index|special_tokens_map|added_tokens|preprocessor_config)\.json"
    r"|tokenizer[\w.-]*\.(json|model)|vocab[\w.-]*\.(json|txt)|merges[\w.-]*\.txt|[\w.-]*\.model"
    r"|chat_template\.(jinja|json)")
JOB_FILES = re.compile(r"\.run\.json$|\.partial$|\.flexgen-tmp\.")  # a job's own, whatever its output's name


def model_fingerprint(source: ModelSource, *, dtypes: Dtypes, policy: Policy) -> str:
    """A hex digest; equal for runs whose outputs are the same."""
    about = {
        "weights": source.weights.fingerprint(),
        "files": model_file_hashes(Path(source.name)),
        "dtypes": {"compute": dtypes.compute, "storage": dtypes.storage},
        "compression": {
            "compress_weight": policy.compress_weight,
            "compress_cache": policy.compress_cache,
            "compression": dataclasses.asdict(policy.compression),
            "cache_dtype": policy.cache_dtype,
            "attn_sparsity": policy.attn_sparsity,
        },
    }
    if not about["files"]:  # not a folder (a generated source): its config stands for it
        about["config"] = source.spec.raw
    return hashlib.sha256(json.dumps(about, sort_keys=True, default=str).encode()).hexdigest()


def model_file_hashes(folder: Path) -> dict[str, str]:
    """The sha256 of each file of the folder that defines the model (MODEL_FILES)."""
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.iterdir()):
        if JOB_FILES.search(path.name) or not MODEL_FILES.fullmatch(path.name) or not path.is_file():
            continue
        found[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


RECORD_VERSION = 1


def progress_paths(output: str | os.PathLike) -> tuple[Path, Path]:
    """(progress file, run record) of an output file."""
    output = os.fspath(output)
    return Path(output + ".partial"), Path(output + ".run.json")


def provenance_path(output: str | os.PathLike) -> Path:
    """Which run made a finished output (its run record and the output's sha256), kept."""
    return Path(os.fspath(output) + ".made-by.json")


@dataclass(frozen=True)
class RunIdentity:
    """What must be the same for a rerun to continue a run instead of mixing two runs' results."""

    model: str  # the caller's fingerprint of the model and anything that changes its outputs
    input_sha256: str  # JobFile.sha256
    settings: Mapping[str, object]  # run-level generation settings, JSON-able
    shard: str = "0/1"
    output_format: str = "native"

    def record(self) -> dict:
        return {"version": RECORD_VERSION, "model": self.model, "input_sha256": self.input_sha256,
                "settings": json.loads(json.dumps(dict(self.settings), sort_keys=True)),
                "shard": self.shard, "output_format": self.output_format}

    def differences(self, recorded: dict) -> list[str]:
        """What differs from a recorded identity, in words, with the values where they are short."""
        now = self.record()
        found = []
        if recorded.get("model") != now["model"]:
            found.append("the model differs")
        if recorded.get("input_sha256") != now["input_sha256"]:
            found.append("the input file's content differs")
        old_settings = recorded.get("settings") or {}
        changed = [f"{name}: {json.dumps(old_settings.get(name))} -> {json.dumps(now['settings'].get(name))}"
                   for name in sorted(set(old_settings) | set(now["settings"]))
                   if old_settings.get(name) != now["settings"].get(name)]
        if changed:
            found.append(f"generation settings differ ({', '.join(changed)})")
        for name, words in (("shard", "the shard"), ("output_format", "the output format")):
            if recorded.get(name) != now[name]:
                found.append(f"{words} differs ({recorded.get(name)} -> {now[name]})")
        return found


def read_run_record(path: Path, *, fix: str) -> dict | None:
    """A run record (the progress record, or a finished shard's provenance), its fields checked
    by type; None if there is none. A record that cannot be read is one line naming the file
    (and the field's line), ending with `fix`."""
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        raise UserError(f"{str(path)!r} is not a run record this version can read; {fix}")
    for name, kind in RECORD_FIELDS.items():
        value = record.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            line = _line_of_key(data, name)
            raise UserError(f"{path}:{line}: the run record's {name!r} is {_json_kind(value)}, not {_json_kind(kind())}; "
                            f"the file was edited or damaged: {fix}")
    return record


RECORD_FIELDS = {"model": str, "input_sha256": str, "settings": dict, "shard": str, "output_format": str,
                 "started_at": int}


def _json_kind(value) -> str:
    if value is None:
        return "missing (or null)"
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a whole number",
            float: "a number"}.get(type(value), type(value).__name__)


def _line_of_key(data: bytes, name: str) -> int:
    at = data.find(f'"{name}"'.encode())
    return data.count(b"\n", 0, at) + 1 if at >= 0 else 1


def made_by_this_run(out: Path, identity: RunIdentity) -> list[str]:
    """The id keys of a finished output that this same run made (its provenance names this
    identity and the output's bytes hash as recorded); else a UserError saying what differs."""
    output = str(out)
    replace = "pass --overwrite to replace it, or choose another file"
    made_by = read_run_record(provenance_path(out), fix=replace)
    if made_by is None:
        raise UserError(f"--output {output!r} already exists and no run of it is recorded; {replace}")
    differences = identity.differences(made_by)
    if differences:
        raise UserError(f"--output {output!r} was made by another run: {'; '.join(differences)} (recorded in "
                        f"{str(provenance_path(out))!r}); {replace}")
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if made_by.get("output_sha256") != digest.hexdigest():
        raise UserError(f"--output {output!r} changed since the run that made it finished (its content no longer "
                        f"matches {str(provenance_path(out))!r}); {replace}")
    return output_keys(out)


def output_keys(out: Path) -> list[str]:
    keys = []
    with open(out, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                keys.append(row_key(json.loads(raw)))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{out}:{line_no}: not a result line of this program; pass --overwrite to start over") from None
    return keys


T = TypeVar("T")

# Flags that change what ranks send each other or compute; capacities, paths and logging may
# differ per node. (Generation settings, the input and the model are compared as themselves.)
SCHEDULE_FLAGS = ("policy", "percent", "gpu_batch_size", "num_gpu_batches", "max_latency", "stage_layers",
                  "compute_dtype", "cache_dtype", "allow_compression", "compress_weight", "compress_cache",
                  "compress_bits", "compress_group_size", "compress_weight_method", "compress_cache_method",
                  "compress_cache_window",
                  "attn_sparsity", "cpu_cache_compute", "comm_backend",
                  "num_prompts", "prompt_len", "truncate")


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
    result, every = pipeline.together(start, what="starting states", share=record)
    first = every[0]
    for rank, theirs in enumerate(every[1:], start=1):
        for field, value in first.items():
            if theirs.get(field) != value:
                raise SharedError(
                    f"the ranks disagree on {field}: rank {rank} has {_shown(theirs.get(field))}, rank 0 "
                    f"{_shown(value)}; start every rank with the same command, model and input files")
    return result


def _shown(value: str | None) -> str:
    return "none" if value is None else value if len(value) <= 60 else value[:57] + "..."
