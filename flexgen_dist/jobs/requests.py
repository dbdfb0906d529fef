"""One request of a job file, and the checks every field goes through.

A `Request` is what a line of `--input` asks for, whatever the file's format: a prompt (text,
token ids or chat messages) and the generation settings the line overrides. A setting left at
None takes the run's value (the command line's `--max-new-tokens`, `--temperature`, ...).
Field checks raise `UserError` with `path:line:` first and say how to fix the value.

Token checks (`check_tokens`, `PromptTokens`): the second pass over a job file, once the
tokenizer and the model's config are known (and before the weights load): every prompt becomes
token ids, which must lie in the vocabulary and, with the line's max_new_tokens, fit the model's
positions. Errors name `path:line:`.

The tokenizer comes in as callables, so this needs neither transformers nor torch:
    tokenize(text) -> token ids (special tokens as the model expects, e.g. BOS)
    chat_template(messages) -> token ids of the conversation with the assistant's turn opened
      (transformers: tokenizer.apply_chat_template(messages, add_generation_prompt=True));
      None when the tokenizer has none.

A `Shard` selects requests by position: shard I of N takes those whose 0-based index in the file is
I mod N (round robin). Why not contiguous ranges: round robin needs no count of the file before
the first request is picked (one streaming pass), and it gives every shard the same mix of the
file even when the file is sorted (by length, by topic), so shards finish at about the same time.
It depends on nothing but the input: a rerun, another machine or another N-way launcher picks the
same requests.
"""

from __future__ import annotations

import json
import math
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

from ..errors import UserError, first_line

Format = Literal["native", "openai"]
COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
TOKEN_ID_LIMIT = 2**31  # token ids are stored as 32-bit ints; no vocabulary comes near this
SEED_LIMIT = 2**63


@dataclass(frozen=True, slots=True)
class GenSettings:
    """Per-request generation settings; None = the run's setting."""

    max_new_tokens: int | None = None  # >= 1
    temperature: float | None = None  # >= 0; 0 means greedy (OpenAI's convention)
    top_p: float | None = None  # in (0, 1]
    top_k: int | None = None  # >= 0; 0 = no top-k (vLLM's -1 is read as 0)
    seed: int | None = None  # in [0, 2**63)
    stop: tuple[str, ...] | None = None  # stop strings; not included in the output (OpenAI)
    stop_token_ids: tuple[int, ...] | None = None  # ids that end a sequence besides EOS


NOT_SET = GenSettings()  # shared by the many lines that set nothing (immutable)


@dataclass(frozen=True, eq=False, slots=True)
class Request:
    """One line of a job file. Exactly one of `text`, `input_ids`, `messages` is set."""

    id: str | int  # the native `id` (default: the line number) or OpenAI's `custom_id`
    index: int  # 0-based position among the file's requests: output order, shards, per-request seeds
    line: int  # 1-based line number in the file, for messages
    path: str  # the job file, for messages
    format: Format
    text: str | None = None
    input_ids: array | None = None  # array("i"): 4 bytes a token, millions of prompts fit
    messages: tuple[dict, ...] | None = None  # chat messages {"role", "content"[, "name"]}
    settings: GenSettings = NOT_SET
    url: str | None = None  # OpenAI only: COMPLETIONS_URL or CHAT_URL
    model: str | None = None  # OpenAI only: body.model, echoed in the response (never used to pick a model)

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.text, self.input_ids, self.messages))
        if given != 1:
            raise ValueError(f"{self.where}: a Request needs exactly one of text, input_ids, messages (got {given})")

    @property
    def key(self) -> str:
        return id_key(self.id)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def prompt(self) -> str | list[int] | list[dict]:
        """The prompt as given (what the former `JobLine.prompt` held, plus chat messages)."""
        if self.text is not None:
            return self.text
        if self.input_ids is not None:
            return self.input_ids.tolist()
        return list(self.messages)


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


def shard_output_path(output: str, shard: Shard) -> str:
    """`results.jsonl` -> `results.shard-2-of-4.jsonl`; the whole file keeps the name as given."""
    if shard.count == 1 or output == "-":
        return output
    path = Path(output)
    return str(path.with_name(f"{path.stem}.shard-{shard.index}-of-{shard.count}{path.suffix}"))


def lone_surrogate(text: str) -> int | None:
    """The index of the first UTF-16 surrogate in `text` (not a character: UTF-8 cannot hold it,
    the tokenizer and the output writer fail on it), or None. JSON's "\\ud800" escape and an
    argument of bytes that are not UTF-8 (read with surrogateescape) both make one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_text(text: str, where: str) -> None:
    """Refuse text that is not valid Unicode, naming `where` (path:line or a flag)."""
    at = lone_surrogate(text)
    if at is None:
        return
    code = ord(text[at])
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a command-line argument, kept by surrogateescape
        raise UserError(f"{where}: byte 0x{code - 0xDC00:02x} at character {at + 1} is not UTF-8; pass UTF-8 text")
    raise UserError(f"{where}: character {at + 1} is \\u{code:04x}, half of a UTF-16 surrogate pair without its "
                    f"other half, which is not text; write the character itself, or both halves of its pair")


def check_strings(value, where: str, name: str = "the line") -> None:
    """Every string in a parsed JSON value (keys too) is valid Unicode; `where` is path:line and
    `name` the field that holds `value`, for the message."""
    if isinstance(value, str):
        check_text(value, f"{where}: {name}")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, f"{where}: a key in {name}")
            check_strings(item, where, repr(key))
    elif isinstance(value, list):
        for item in value:
            check_strings(item, where, name)


def id_key(value: str | int) -> str:
    """Canonical text of an id, so that "7" and 7 stay different ids and compare across files."""
    return json.dumps(value, ensure_ascii=False)


def check_id(value, name: str, where: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{where}: {name!r} must be a string or a whole number, got {json.dumps(value)[:40]}")
    return value


def whole(value, name: str, where: str, minimum: int | None = None, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: {name!r} must be a whole number, got {json.dumps(value)[:40]}")
    if minimum is not None and value < minimum:
        raise UserError(f"{where}: {name!r} is {value}; it must be at least {minimum}")
    if limit is not None and value >= limit:
        raise UserError(f"{where}: {name!r} is {value}; it must be below {limit}")
    return value


def number(value, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: {name!r} must be a number, got {json.dumps(value)[:40]}")
    return float(value)


def token_ids(value, name: str, where: str, allow_empty: bool = False) -> array:
    if not isinstance(value, list):
        raise UserError(f"{where}: {name!r} must be a list of token ids (whole numbers)")
    for position, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int):
            raise UserError(f"{where}: {name!r}[{position}] is {json.dumps(token)[:40]}; token ids are whole numbers")
        if not 0 <= token < TOKEN_ID_LIMIT:
            raise UserError(f"{where}: {name!r}[{position}] is {token}; token ids are >= 0 and inside the vocabulary")
    if not value and not allow_empty:
        raise UserError(f"{where}: {name!r} is empty; a prompt needs at least one token")
    return array("i", value)


def stop_strings(value, name: str, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise UserError(f"{where}: {name!r} must be a string or a list of strings")
    if any(s == "" for s in items):
        raise UserError(f"{where}: {name!r} holds an empty string, which would stop at once; remove it")
    return tuple(items)


def parse_settings(obj: dict, names: dict[str, str], where: str) -> GenSettings:
    """GenSettings from the fields of `obj`; `names` maps a field name in the file to a
    GenSettings field (several file names may map to one field: the first one present wins,
    two present is an error). JSON null means "not set"."""
    values: dict[str, object] = {}
    source: dict[str, str] = {}
    for name, target in names.items():
        value = obj.get(name)
        if value is None:
            continue
        if target in source:
            raise UserError(f"{where}: both {source[target]!r} and {name!r} are set; keep one")
        source[target] = name
        if target == "max_new_tokens":
            values[target] = whole(value, name, where, minimum=1)
        elif target == "temperature":
            temperature = number(value, name, where)
            if temperature < 0:
                raise UserError(f"{where}: {name!r} is {temperature:g}; it must be >= 0 (0 = greedy)")
            values[target] = temperature
        elif target == "top_p":
            top_p = number(value, name, where)
            if not 0 < top_p <= 1:
                raise UserError(f"{where}: {name!r} is {top_p:g}; it must be in (0, 1] (1 = off)")
            values[target] = top_p
        elif target == "top_k":
            top_k = whole(value, name, where, minimum=-1)
            values[target] = max(top_k, 0)  # vLLM writes -1 for "off", as 0 is here
        elif target == "seed":
            values[target] = whole(value, name, where, minimum=0, limit=SEED_LIMIT)
        elif target == "stop":
            values[target] = stop_strings(value, name, where)
        elif target == "stop_token_ids":
            values[target] = tuple(token_ids(value, name, where, allow_empty=True))
        else:
            raise AssertionError(f"no check for setting {target!r}")
    return GenSettings(**values) if values else NOT_SET


Tokenize = Callable[[str], Sequence[int]]
ChatTemplate = Callable[[list[dict]], Sequence[int]]


@dataclass(frozen=True, eq=False, slots=True)
class PromptTokens:
    """A request ready for the engine."""

    request: Request
    prompt_ids: array  # array("i") after the chat template and any truncation
    max_new_tokens: int  # the line's, else the run's default
    truncated: int  # tokens dropped from the left (truncate="left"), else 0


def check_tokens(
    requests: Iterable[Request],
    *,
    tokenize: Tokenize | None,
    vocab_size: int,
    max_positions: int,
    default_max_new_tokens: int,
    truncate: Literal["none", "left"] = "none",
    chat_template: ChatTemplate | None = None,
) -> list[PromptTokens]:
    """Tokenize and check every request; raise UserError at the first line that cannot run.
    `tokenize` is None when the model has no tokenizer: then only token-id prompts work, and
    neither stop strings nor OpenAI output (which needs text) can be served."""
    if truncate not in ("none", "left"):
        raise ValueError(f"truncate must be 'none' or 'left', got {truncate!r}")
    if default_max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {default_max_new_tokens}")
    prepared = []
    for request in requests:
        prepared.append(_check_one(request, tokenize, vocab_size, max_positions, default_max_new_tokens,
                                   truncate, chat_template))
    return prepared


def _check_one(request: Request, tokenize: Tokenize | None, vocab_size: int, max_positions: int,
               default_max_new_tokens: int, truncate: str, chat_template: ChatTemplate | None) -> PromptTokens:
    where = request.where
    if tokenize is None:
        if request.format == "openai":
            raise UserError(f"{where}: OpenAI batch output needs text, but this model has no tokenizer; "
                            f"use the native format with 'input_ids'")
        if request.text is not None:
            raise UserError(f"{where}: the prompt is text but this model has no tokenizer; give 'input_ids' instead")
        if request.settings.stop:
            raise UserError(f"{where}: 'stop' strings need a tokenizer to decode the output; use 'stop_token_ids'")
    if request.messages is not None:
        if chat_template is None:
            raise UserError(f"{where}: chat messages need the tokenizer's chat template, and this model's tokenizer has "
                            f"none; send a 'prompt' to /v1/completions, or add a chat_template to tokenizer_config.json")
        try:
            ids = array("i", chat_template(list(request.messages)))
        except Exception as exc:  # the template's own checks, e.g. "roles must alternate"
            raise UserError(f"{where}: the chat template rejects these messages: {first_line(exc)}") from None
    elif request.text is not None:
        ids = array("i", tokenize(request.text))
    else:
        ids = request.input_ids
    if len(ids) == 0:
        raise UserError(f"{where}: the prompt has no tokens; give it some text or token ids")
    for name, values in (("prompt", ids), ("stop_token_ids", request.settings.stop_token_ids or ())):
        bad = next((token for token in values if not 0 <= token < vocab_size), None)
        if bad is not None:
            raise UserError(f"{where}: {name} holds token id {bad}, outside this model's vocabulary [0, {vocab_size})")
    max_new_tokens = request.settings.max_new_tokens or default_max_new_tokens
    room = max_positions - max_new_tokens
    if room < 1:
        raise UserError(f"{where}: max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                        f"{max_positions} positions; lower max_new_tokens")
    truncated = 0
    if len(ids) > room:
        if truncate != "left":
            raise UserError(f"{where}: the prompt has {len(ids)} tokens + max_new_tokens {max_new_tokens} > the model's "
                            f"{max_positions} positions; shorten it, lower max_new_tokens, or pass --truncate left")
        truncated = len(ids) - room
        ids = ids[truncated:]
    return PromptTokens(request=request, prompt_ids=ids, max_new_tokens=max_new_tokens, truncated=truncated)
