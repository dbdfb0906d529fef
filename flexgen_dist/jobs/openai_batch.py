"""The OpenAI / vLLM batch format: input lines `{"custom_id", "method": "POST", "url", "body"}`
and output lines `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.

Body fields are sorted into three kinds, so that nothing that changes the answer is silently
dropped: used (the prompt and the sampling settings below), ignored (bookkeeping such as `model`
or `user`), and refused unless left at their default (`n` > 1, `logprobs`, `echo`, penalties,
tools, ...: not supported here). A field in none of the lists is refused too: a new sampling knob
must not be ignored quietly.
"""

from __future__ import annotations

import hashlib
import json

from ..errors import UserError
from .requests import CHAT_URL, COMPLETIONS_URL, Request, check_id, parse_settings, token_ids

TOP_KEYS = ("custom_id", "method", "url", "body")
SETTINGS = {  # body field -> GenSettings field; top_k and stop_token_ids are vLLM's extensions
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
}
IGNORED = frozenset({"model", "user", "metadata", "store", "service_tier", "stream_options",
                     "prompt_cache_key", "safety_identifier", "parallel_tool_calls"})
# field -> values that mean "the default", i.e. nothing this runtime would have to do differently
DEFAULT_ONLY = {
    "n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,),
    "stream": (False,), "suffix": ("",), "presence_penalty": (0,), "frequency_penalty": (0,),
    "repetition_penalty": (1,), "logit_bias": ({},), "tools": ([],), "functions": ([],),
    "tool_choice": ("none",), "response_format": ({"type": "text"},), "min_tokens": (0,),
    "ignore_eos": (False,), "include_stop_str_in_output": (False,), "modalities": (["text"],),
}


NATIVE_PROMPT_KEYS = ("prompt", "input_ids")  # a native line's prompt; an OpenAI line keeps it in its body


def is_openai_line(obj: dict) -> bool:
    """An OpenAI batch line has custom_id, method, url and body, and a line with a custom_id is
    one (a part missing or a stray native key is then refused by name). Otherwise a line with a
    native prompt is native even with keys of the user's own named like the others (the `url` and
    `method` of a page to summarise); one with neither is an OpenAI line that lacks parts."""
    if "custom_id" in obj or all(key in obj for key in TOP_KEYS):
        return True
    if any(key in obj for key in NATIVE_PROMPT_KEYS):
        return False
    return any(key in obj for key in TOP_KEYS)


def parse_openai_line(obj: dict, *, index: int, line: int, path: str) -> Request:
    where = f"{path}:{line}"
    for key in obj:
        if key not in TOP_KEYS:
            raise UserError(f"{where}: unknown key {key!r} in an OpenAI batch line; the keys are {', '.join(TOP_KEYS)}")
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
                  settings=parse_settings(body, SETTINGS, where), model=_model_name(body, where))
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
        if key in SETTINGS or key in IGNORED or key in ("prompt", "messages"):
            if key == "max_completion_tokens" and url != CHAT_URL:
                raise UserError(f"{where}: 'max_completion_tokens' belongs to {CHAT_URL}; use 'max_tokens'")
            continue
        if key in DEFAULT_ONLY:
            if value is None or any(_same(value, ok) for ok in DEFAULT_ONLY[key]):
                continue
            raise UserError(f"{where}: body field {key!r} = {json.dumps(value)[:40]} is not supported; "
                            f"remove it (one completion per line, no log-probabilities, penalties or tools)")
        raise UserError(f"{where}: unknown body field {key!r}; supported: {', '.join(['prompt', 'messages', *SETTINGS])} "
                        f"(ignored: {', '.join(sorted(IGNORED))})")


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
