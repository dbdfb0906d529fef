"""Output lines: what a finished request becomes in `--output`.

Native format (input lines with `prompt` / `input_ids`), one line per request:
    {"id": <the input's id>, "output_ids": [...], "text": "...", "finish_reason": "stop" | "length",
     "usage": {"prompt_tokens": P, "completion_tokens": C, "total_tokens": P + C}}
`text` is there when the model has a tokenizer; `finish_reason` is "stop" when the sequence ended
at EOS, a stop token id or a stop string, "length" when it reached max_new_tokens; `usage` counts
the prompt after any chat template and truncation. OpenAI batch input gives OpenAI batch output
(see openai_batch.py). Both carry the request's id, which `row_key` reads back for resume and merge.
"""

from __future__ import annotations

import json
import time
from typing import Iterable, Sequence, TextIO

from ..api.results import Output
from ..cli.streams import can_encode
from .openai_batch import openai_output_row
from .requests import Request, id_key


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
