"""JSONL job files: `--input` lines `{"id": ..., "prompt": "..."}` or `{"id": ..., "input_ids": [...]}`,
`--output` one line per input line, same order, with the same id."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class JobLine:
    id: object
    prompt: str | list[int]


def read_jsonl(path: str | Path) -> list[JobLine]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file {str(path)!r} does not exist")
    lines = []
    with open(path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                item = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if not isinstance(item, dict):
                raise UserError(f"{where}: expected a JSON object with 'prompt' or 'input_ids'")
            if "prompt" in item:
                prompt = item["prompt"]
                if not isinstance(prompt, str):
                    raise UserError(f"{where}: 'prompt' must be a string")
            elif "input_ids" in item:
                prompt = item["input_ids"]
                if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                    raise UserError(f"{where}: 'input_ids' must be a list of whole numbers")
            else:
                raise UserError(f"{where}: needs a 'prompt' (text) or 'input_ids' (token ids) field")
            lines.append(JobLine(item.get("id", line_no), prompt))
    if not lines:
        raise UserError(f"input file {str(path)!r} has no prompts")
    return lines


def check_writable(path: str | Path) -> None:
    """Fail before the job runs, not after hours of work."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise UserError(f"cannot write --output {str(path)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write --output {str(path)!r}: folder {str(parent)!r} is not writable")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Atomically: the old file stays whole until the new one is complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_stats(path: str | Path, stats, policy, world_size: int) -> None:
    """Machine-readable run statistics (what benchmarks parse)."""
    data = {
        "world_size": world_size,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "total_s": stats.total_s,
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "prefill_tokens_per_s": stats.prefill_tokens_per_s,
        "decode_tokens_per_s": stats.decode_tokens_per_s,
        "tokens_per_s": stats.tokens_per_s,
        "policy": dataclasses.asdict(policy),
    }
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
