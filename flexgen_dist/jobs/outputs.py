"""Where results go, and what a finished result is: checks on `--output` and the other files a
run writes, the result lines, and the records kept beside an output.

`check_output_path` refuses, before any work, a folder, a device, a FIFO, a socket or a symbolic
link at the output path (or at the progress files beside it), a missing or read-only folder, a
file that cannot be replaced, and the input file itself. `-` is standard output and is always
accepted. Side files (`--trace`, `--stats-json`) get the same checks (run.py `check_side_files`),
and each must be a path of its own. Files are written by `flexgen_dist.files` (whole or not at
all, never through a link).

Result lines, native format (input lines with `prompt` / `input_ids`), one line per request:
    {"id": <the input's id>, "output_ids": [...], "text": "...", "finish_reason": "stop" | "length",
     "usage": {"prompt_tokens": P, "completion_tokens": C, "total_tokens": P + C}}
`text` is there when the model has a tokenizer; `finish_reason` is "stop" when the sequence ended
at EOS, a stop token id or a stop string, "length" when it reached max_new_tokens; `usage` counts
the prompt after any chat template and truncation. OpenAI batch input gives OpenAI batch output
lines, `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`. Both
carry the request's id, which `row_key` reads back for resume and merge.

Records: a run's identity (`RunIdentity`: the model's fingerprint, the input's hash, the generation
settings, the shard, the output format) is written as the run record beside an unfinished output
(`OUT.run.json`, resume.py) and, once the output is finished, with the output's sha256 as its
provenance (`OUT.made-by.json`), which `merge` and a rerun of a finished job read back
(`read_run_record`, every field checked by type).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence, TextIO

from ..api.results import Output
from ..cli.streams import can_encode
from ..errors import UserError
from ..files import describe_kind, open_nofollow
from .requests import CHAT_URL, Request, id_key

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


def output_row(request: Request, completion: Output, *, model_name: str, created: int) -> dict:
    """The output line for `request`. `model_name` fills OpenAI's `model` when the request did
    not name one; `created` is OpenAI's Unix time (use ResumeLog.started_at: the same across a
    resumed run, so an interrupted run's lines match an uninterrupted one's up to that stamp)."""
    completion_tokens = len(completion.output_ids)
    if request.format == "openai":
        if completion.text is None:
            raise ValueError(f"{request.where}: OpenAI batch output needs the decoded text (no tokenizer?)")
        return openai_output_row(
            request, output_text=completion.text, finish_reason=completion.finish_reason,
            prompt_tokens=completion.prompt_tokens, completion_tokens=completion_tokens,
            model_name=model_name, created=created,
        )
    row: dict = {"id": request.id, "output_ids": [int(t) for t in completion.output_ids]}
    if completion.text is not None:
        row["text"] = completion.text
    row["finish_reason"] = completion.finish_reason
    row["usage"] = {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": completion.prompt_tokens + completion_tokens}
    return row


def row_key(row: dict) -> str:
    """The request id an output line answers, in `id_key` form: OpenAI lines by `custom_id`
    (their `id` is the response's), native lines by `id`. KeyError when the line has neither."""
    if "custom_id" in row:
        return id_key(row["custom_id"])
    return id_key(row["id"])


class StdoutLog:
    """`--output -`: the same calls, lines kept in memory and printed in input order at the end.
    Nothing survives a crash, so there is nothing to resume."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: dict[str, str] = {}
        self.started_at = int(time.time())
        self.complete = False

    @property
    def finished(self):
        return self._lines.keys()

    def append(self, rows: Sequence[dict]) -> None:
        for row in rows:
            key = row_key(row)
            if key in self._lines:
                raise ValueError(f"id {key} already has a result; each id is written once")
            line = json.dumps(row, ensure_ascii=False) + "\n"
            if not can_encode(self._stream, line):  # an ASCII-only terminal: the same JSON, escaped
                line = json.dumps(row) + "\n"
            self._lines[key] = line

    def finish(self, order: Iterable[str]) -> None:
        order = list(order)
        if sorted(order) != sorted(self._lines):
            raise ValueError("finish(): the order does not name every result exactly once")
        for key in order:
            self._stream.write(self._lines[key])
        self._stream.flush()

    def close(self) -> None:
        pass


def response_ids(custom_id: str) -> str:
    """Deterministic ids for an output line, from the custom_id alone: a resumed or repeated run
    writes the same line as an uninterrupted one, and custom_ids are unique in a file, so these
    are too (96 bits of SHA-256; OpenAI's own ids are random, clients treat them as opaque)."""
    return hashlib.sha256(custom_id.encode("utf-8")).hexdigest()[:24]


def openai_output_row(request: Request, *, output_text: str, finish_reason: str, prompt_tokens: int,
                      completion_tokens: int, model_name: str, created: int) -> dict:
    """One line of OpenAI's batch output, for a request that succeeded."""
    digest = response_ids(request.id)
    if request.url == CHAT_URL:
        choice = {"index": 0, "message": {"role": "assistant", "content": output_text},
                  "logprobs": None, "finish_reason": finish_reason}
        body_id, kind = f"chatcmpl-{digest}", "chat.completion"
    else:
        choice = {"index": 0, "text": output_text, "logprobs": None, "finish_reason": finish_reason}
        body_id, kind = f"cmpl-{digest}", "text_completion"
    body = {
        "id": body_id,
        "object": kind,
        "created": created,
        "model": request.model or model_name,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    return {"id": f"batch_req_{digest}", "custom_id": request.id,
            "response": {"status_code": 200, "request_id": f"req_{digest}", "body": body}, "error": None}
