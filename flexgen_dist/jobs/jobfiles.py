"""Job files (`--input FILE.jsonl`): read and validate every line before the model loads.

Two formats, detected from the first line (one file holds one format):
- native: `{"id": ..., "prompt": "text"}` or `{"id": ..., "input_ids": [...]}`, optionally with
  `max_new_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop` (a string or a list of them)
  and `stop_token_ids`. `id` (a string or a whole number) defaults to the line number. Other keys
  are the user's own (labels, metadata) and are ignored, except names that look like a setting
  spelled another way (`max_tokens`, `messages`, ...), which are refused with the right name.
- OpenAI / vLLM batch: `{"custom_id", "method": "POST", "url", "body"}` (openai_batch.py).

The file is streamed: each line is read, checked and turned into a `Request`; only the requests
of the selected shard are kept, and the whole file is hashed for the resume identity. Errors name
`path:line:` and say how to fix them. Blank lines are skipped (they keep their line numbers).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .requests import Format, GenSettings, Request, check_id, check_strings, parse_settings, token_ids
from .openai_batch import is_openai_line, parse_openai_line
from .shards import Shard

NATIVE_SETTINGS = {name: name for name in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids")}
NATIVE_MISNAMED = {
    "max_tokens": "use 'max_new_tokens'",
    "max_length": "use 'max_new_tokens' (new tokens, not prompt + new)",
    "stop_sequences": "use 'stop'",
    "text": "use 'prompt'",
    "messages": "chat messages need the OpenAI batch format ({\"custom_id\", \"method\", \"url\": \"/v1/chat/completions\", \"body\"})",
    "n": "one completion per line: repeat the line with another id",
}
TOO_DEEP = ("the JSON is nested too deeply to read; a line holds one flat object of settings (lists and objects a "
            "few levels deep at most)")
FORMAT_NAMES = {"native": "a native line ({\"id\", \"prompt\" or \"input_ids\"})", "openai": "an OpenAI batch line"}


@dataclass(frozen=True)
class JobFile:
    """A validated job file: this shard's requests in input order, and facts about the whole file."""

    path: str
    format: Format
    sha256: str  # of the file's bytes: the resume identity's "same input"
    num_requests: int  # in the whole file, every shard
    requests: list[Request]  # the selected shard's, in input order

    @property
    def keys(self) -> list[str]:
        """The selected requests' ids in input order (what ResumeLog.finish takes)."""
        return [request.key for request in self.requests]


class JobFileScanner:
    """Iterate over every request of a file, validated (ids unique across the whole file, one
    format). After a complete iteration, `format`, `sha256` and `num_requests` describe the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.format: Format | None = None
        self.sha256: str | None = None
        self.num_requests = 0

    def __iter__(self) -> Iterator[Request]:
        path = Path(self.path)
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a regular file"
            raise UserError(f"input file {self.path!r} {what}")
        digest = hashlib.sha256()
        first_line_of: dict[str, int] = {}  # id key -> line, for duplicate messages
        format_line = 0
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                digest.update(raw)
                obj = self._parse_json(raw, line_no)
                if obj is None:
                    continue
                kind: Format = "openai" if is_openai_line(obj) else "native"
                if self.format is None:
                    self.format, format_line = kind, line_no
                elif kind != self.format:
                    raise UserError(
                        f"{self.path}:{line_no}: {FORMAT_NAMES[kind]}, but line {format_line} is {FORMAT_NAMES[self.format]}; "
                        f"one file holds one format: convert the lines or split the file"
                    )
                if kind == "openai":
                    request = parse_openai_line(obj, index=self.num_requests, line=line_no, path=self.path)
                else:
                    request = parse_native_line(obj, index=self.num_requests, line=line_no, path=self.path)
                earlier = first_line_of.setdefault(request.key, line_no)
                if earlier != line_no:
                    name = "custom_id" if kind == "openai" else "id"
                    raise UserError(f"{self.path}:{line_no}: {name} {request.key} is also on line {earlier}; ids must be unique")
                self.num_requests += 1
                yield request
        if self.num_requests == 0:
            raise UserError(f"input file {self.path!r} has no prompts; put one JSON object per line")
        self.sha256 = digest.hexdigest()

    def _parse_json(self, raw: bytes, line_no: int) -> dict | None:
        where = f"{self.path}:{line_no}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{where}: byte {exc.start + 1} of the line is not UTF-8; save the file as UTF-8") from None
        if line_no == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark from some editors
        if not text.strip():
            return None
        try:
            obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object") from None
        except ValueError as exc:  # from the hooks
            raise UserError(f"{where}: {exc}") from None
        except RecursionError:  # the parser recurses once per level: thousands of [[[... exhaust the stack
            raise UserError(f"{where}: {TOO_DEEP}") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: a JSON {type(obj).__name__}, not an object; each line must be one JSON object {{...}}")
        if "\\u" in text:  # only a \u escape makes a lone surrogate (the bytes were checked as UTF-8)
            try:
                check_strings(obj, where)
            except RecursionError:
                raise UserError(f"{where}: {TOO_DEEP}") from None
        return obj


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice in one object; keep one")
        seen.add(key)
    return dict(pairs)


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number JSON allows; give a finite number")


def parse_native_line(obj: dict, *, index: int, line: int, path: str) -> Request:
    where = f"{path}:{line}"
    for key, hint in NATIVE_MISNAMED.items():
        if key in obj:
            raise UserError(f"{where}: unknown key {key!r}: {hint}")
    request_id = check_id(obj["id"], "id", where) if obj.get("id") is not None else line
    settings: GenSettings = parse_settings(obj, NATIVE_SETTINGS, where)
    common = dict(id=request_id, index=index, line=line, path=path, format="native", settings=settings)
    if "prompt" in obj and "input_ids" in obj:
        raise UserError(f"{where}: both 'prompt' and 'input_ids' are given; keep one")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise UserError(f"{where}: 'prompt' must be a string (token ids go in 'input_ids')")
        return Request(text=obj["prompt"], **common)
    if "input_ids" in obj:
        return Request(input_ids=token_ids(obj["input_ids"], "input_ids", where), **common)
    raise UserError(f"{where}: needs a 'prompt' (text) or 'input_ids' (token ids)")


def read_job_file(path: str | Path, shard: Shard | None = None) -> JobFile:
    """Validate the whole file and keep the requests of `shard` (all of them without one)."""
    shard = shard or Shard(index=0, count=1)
    scanner = JobFileScanner(path)
    requests = [request for request in scanner if shard.selects(request.index)]
    return JobFile(path=str(path), format=scanner.format, sha256=scanner.sha256,
                   num_requests=scanner.num_requests, requests=requests)

