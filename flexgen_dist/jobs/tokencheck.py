"""The second pass over a job file, once the tokenizer and the model's config are known (and
before the weights load): every prompt becomes token ids, which must lie in the vocabulary and,
with the line's max_new_tokens, fit the model's positions. Errors name `path:line:`.

The tokenizer comes in as callables, so this needs neither transformers nor torch:
    tokenize(text) -> token ids (special tokens as the model expects, e.g. BOS)
    chat_template(messages) -> token ids of the conversation with the assistant's turn opened
      (transformers: tokenizer.apply_chat_template(messages, add_generation_prompt=True));
      None when the tokenizer has none.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

from ..errors import UserError, first_line
from .requests import Request

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
