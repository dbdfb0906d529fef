"""Job files (`--input FILE.jsonl`): read and validate every line before the model loads.

Two formats, detected from the first line (one file holds one format):
- native: `{"id": ..., "prompt": "text"}` or `{"id": ..., "input_ids": [...]}`, optionally with
  `max_new_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop` (a string or a list of them)
  and `stop_token_ids`. `id` (a string or a whole number) defaults to the line number. Other keys
  are the user's own (labels, metadata) and are ignored, except names that look like a setting
  spelled another way (`max_tokens`, `messages`, ...), which are refused with the right name.
- OpenAI / vLLM batch: `{"custom_id", "method": "POST", "url", "body"}` (its output lines:
  outputs.py `openai_output_row`). Body fields are sorted into three kinds, so that nothing that
  changes the answer is silently dropped: used (the prompt and the sampling settings below),
  ignored (bookkeeping such as `model` or `user`), and refused unless left at their default (`n` >
  1, `logprobs`, `echo`, penalties, tools, ...: not supported here). A field in none of the lists
  is refused too: a new sampling knob must not be ignored quietly.

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
from .requests import (CHAT_URL, COMPLETIONS_URL, Format, GenSettings, Request, Shard, check_id, check_strings,
                       parse_settings, token_ids)

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
OPENAI_KEYS = ("custom_id", "method", "url", "body")
OPENAI_SETTINGS = {  # body field -> GenSettings field; top_k and stop_token_ids are vLLM's extensions
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
}
OPENAI_IGNORED = frozenset({"model", "user", "metadata", "store", "service_tier", "stream_options",
                     "prompt_cache_key", "safety_identifier", "parallel_tool_calls"})
# field -> values that mean "the default", i.e. nothing this runtime would have to do differently
OPENAI_DEFAULT_ONLY = {
    "n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,),
    "stream": (False,), "suffix": ("",), "presence_penalty": (0,), "frequency_penalty": (0,),
    "repetition_penalty": (1,), "logit_bias": ({},), "tools": ([],), "functions": ([],),
    "tool_choice": ("none",), "response_format": ({"type": "text"},), "min_tokens": (0,),
    "ignore_eos": (False,), "include_stop_str_in_output": (False,), "modalities": (["text"],),
}
NATIVE_PROMPT_KEYS = ("prompt", "input_ids")  # a native line's prompt; an OpenAI line keeps it in its body


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


def read_job_file(path: str | Path, shard: Shard | None = None) -> JobFile:
    """Validate the whole file and keep the requests of `shard` (all of them without one)."""
    shard = shard or Shard(index=0, count=1)
    scanner = JobFileScanner(path)
    requests = [request for request in scanner if shard.selects(request.index)]
    return JobFile(path=str(path), format=scanner.format, sha256=scanner.sha256,
                   num_requests=scanner.num_requests, requests=requests)


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


def is_openai_line(obj: dict) -> bool:
    """An OpenAI batch line has custom_id, method, url and body, and a line with a custom_id is
    one (a part missing or a stray native key is then refused by name). Otherwise a line with a
    native prompt is native even with keys of the user's own named like the others (the `url` and
    `method` of a page to summarise); one with neither is an OpenAI line that lacks parts."""
    if "custom_id" in obj or all(key in obj for key in OPENAI_KEYS):
        return True
    if any(key in obj for key in NATIVE_PROMPT_KEYS):
        return False
    return any(key in obj for key in OPENAI_KEYS)


def parse_openai_line(obj: dict, *, index: int, line: int, path: str) -> Request:
    where = f"{path}:{line}"
    for key in obj:
        if key not in OPENAI_KEYS:
            raise UserError(f"{where}: unknown key {key!r} in an OpenAI batch line; the keys are {', '.join(OPENAI_KEYS)}")
    if "custom_id" not in obj:
        raise UserError(f"{where}: an OpenAI batch line needs a 'custom_id' (a unique string)")
    custom_id = check_id(obj["custom_id"], "custom_id", where)
    if not isinstance(custom_id, str) or not custom_id:
        raise UserError(f"{where}: 'custom_id' must be a non-empty string (OpenAI's batch format)")
    method = obj.get("method")
    if method != "POST":
        raise UserError(f"{where}: 'method' is {json.dumps(method)}; batch requests use \"POST\"")
    url = obj.get("url")
    if url not in (COMPLETIONS_URL, CHAT_URL):
        raise UserError(f"{where}: 'url' {json.dumps(url)} is not supported; use {COMPLETIONS_URL!r} or {CHAT_URL!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise UserError(f"{where}: 'body' must be a JSON object with the request's fields")
    _check_body_fields(body, url, where)
    common = dict(id=custom_id, index=index, line=line, path=path, format="openai", url=url,
                  settings=parse_settings(body, OPENAI_SETTINGS, where), model=_model_name(body, where))
    if url == COMPLETIONS_URL:
        if "messages" in body:
            raise UserError(f"{where}: 'messages' belongs to {CHAT_URL}; {COMPLETIONS_URL} takes a 'prompt'")
        if "prompt" not in body:
            raise UserError(f"{where}: the body needs a 'prompt' (a string or a list of token ids)")
        prompt = _completion_prompt(body["prompt"], where)
        if isinstance(prompt, str):
            return Request(text=prompt, **common)
        return Request(input_ids=prompt, **common)
    if "prompt" in body:
        raise UserError(f"{where}: 'prompt' belongs to {COMPLETIONS_URL}; {CHAT_URL} takes 'messages'")
    if "messages" not in body:
        raise UserError(f"{where}: the body needs 'messages' (a list of {{\"role\", \"content\"}} objects)")
    return Request(messages=_messages(body["messages"], where), **common)


def _check_body_fields(body: dict, url: str, where: str) -> None:
    for key, value in body.items():
        if key in OPENAI_SETTINGS or key in OPENAI_IGNORED or key in ("prompt", "messages"):
            if key == "max_completion_tokens" and url != CHAT_URL:
                raise UserError(f"{where}: 'max_completion_tokens' belongs to {CHAT_URL}; use 'max_tokens'")
            continue
        if key in OPENAI_DEFAULT_ONLY:
            if value is None or any(_same(value, ok) for ok in OPENAI_DEFAULT_ONLY[key]):
                continue
            raise UserError(f"{where}: body field {key!r} = {json.dumps(value)[:40]} is not supported; "
                            f"remove it (one completion per line, no log-probabilities, penalties or tools)")
        raise UserError(f"{where}: unknown body field {key!r}; supported: {', '.join(['prompt', 'messages', *OPENAI_SETTINGS])} "
                        f"(ignored: {', '.join(sorted(OPENAI_IGNORED))})")


def _same(value, default) -> bool:
    """JSON equality where 0 == 0.0 but False != 0 (a bool is not a count)."""
    if isinstance(value, bool) or isinstance(default, bool):
        return type(value) is type(default) and value == default
    return value == default


def _model_name(body: dict, where: str) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise UserError(f"{where}: 'model' must be a string")
    return model


def _completion_prompt(prompt, where: str):
    """A string or a list of token ids, as OpenAI's completions API takes; a list holding one of
    those is one prompt too. Several prompts in one line would need several outputs: refused."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise UserError(f"{where}: 'prompt' holds {len(prompt)} prompts; put one prompt per line (each with its own custom_id)")
    if not isinstance(prompt, list):
        raise UserError(f"{where}: 'prompt' must be a string or a list of token ids")
    return token_ids(prompt, "prompt", where)


def _messages(messages, where: str) -> tuple[dict, ...]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    result = []
    for position, message in enumerate(messages):
        at = f"{where}: messages[{position}]"
        if not isinstance(message, dict):
            raise UserError(f"{at} must be an object with 'role' and 'content'")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise UserError(f"{at} has {', '.join(sorted(map(repr, extra)))}; only 'role', 'content' and 'name' are supported")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise UserError(f"{at} needs a 'role' string (system, user, assistant)")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise UserError(f"{at}: only text content parts ({{\"type\": \"text\", \"text\": ...}}) are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise UserError(f"{at} needs a 'content' string")
        entry = {"role": role, "content": content}
        if "name" in message:
            if not isinstance(message["name"], str):
                raise UserError(f"{at}: 'name' must be a string")
            entry["name"] = message["name"]
        result.append(entry)
    return tuple(result)
