"""Typed reads of a Hugging Face config.json: a wrong value is one line, never a traceback.

`int("64")` would quietly accept a string and `bool("false")` is True, so nothing here converts:
a field holds the JSON type it should or the user hears about it, with the file, the field, the
value as written and what is expected. A field that is absent (or null, for an optional one)
takes transformers' default, so real checkpoints that leave fields out still load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io_errors import file_error

_FIX = "correct it in config.json or restore the checkpoint's config.json"


def read_config_file(path: Path, *, restore: str = "restore the checkpoint's config.json") -> dict:
    """The settings object of a config.json file (UTF-8 JSON holding an object); `restore` ends
    each message (what to do about the file)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise file_error(exc, path, "read") from None
    if not data.strip():
        raise UserError(f"{str(path)!r} is empty; {restore}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{str(path)!r} is not UTF-8 text (undecodable byte at offset {exc.start}); {restore}"
        ) from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{str(path)!r} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); {restore}"
        ) from None
    if not isinstance(config, dict):
        example = ' ({"model_type": ..., "hidden_size": ...})' if path.name == "config.json" else ""
        raise UserError(
            f"{str(path)!r} holds {describe(config)}, expected a JSON object of settings{example}; {restore}"
        )
    return config


def describe(value: Any) -> str:
    """A JSON value as written, and its kind: '"64" (a string)', 'true (a boolean)'."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if value is None:
        return "null"
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, int):
        kind = "an integer"
    elif isinstance(value, float):
        kind = "a number" if math.isfinite(value) else "not a finite number"
    elif isinstance(value, str):
        kind = "a string"
    elif isinstance(value, list):
        kind = "a list"
    elif isinstance(value, dict):
        kind = "an object"
    else:
        kind = type(value).__name__
    return f"{text} ({kind})"


class ConfigFields:
    """Checked reads of one config's fields. `where` names the file in messages; `model_type`
    says which model needs a required field."""

    def __init__(self, config: dict, where: str, model_type: str, fix: str = _FIX):
        self.config = config
        self.where = where
        self.model_type = model_type
        self.fix = fix

    def bad(self, key: str, value: Any, expected: str) -> UserError:
        return UserError(f"{self.where}: {key!r} is {describe(value)}, expected {expected}; {self.fix}")

    def _value(self, key: str, required: bool, expected: str):
        if key not in self.config:
            if required:
                raise UserError(
                    f"{self.where} has no {key!r} ({expected}), needed for a {self.model_type} model; "
                    "is the checkpoint's config.json complete?"
                )
            return None
        value = self.config[key]
        if value is None and required:
            raise self.bad(key, value, expected)
        return value

    def integer(self, key: str, default: int | None = None, *, required: bool = False, minimum: int = 1) -> int | None:
        """An integer >= minimum. Absent or null: `default` (unless required)."""
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        value = self._value(key, required, expected)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.bad(key, value, expected)
        return value

    def number(self, key: str, default: float | None = None, *, required: bool = False) -> float | None:
        """A finite number > 0 (an integer is fine). Absent or null: `default` (unless required)."""
        value = self._value(key, required, "a number > 0")
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise self.bad(key, value, "a number > 0")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        """true or false (not "false", not 0). Absent or null: `default`."""
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.bad(key, value, "true or false")
        return value

    def text(self, key: str, default: str | None) -> str | None:
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.bad(key, value, "a string")
        return value

    def object(self, key: str) -> dict | None:
        """A JSON object or null (absent: None)."""
        value = self.config.get(key)
        if value is not None and not isinstance(value, dict):
            raise self.bad(key, value, "an object or null")
        return value

    def token_id(self, key: str) -> int | None:
        """A token id (an integer) or null. A negative id means "none" (old Llama configs write
        pad_token_id -1); ids are only used to pad, and padded positions are masked."""
        value = self.config.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.bad(key, value, "a token id (an integer) or null")
        return value if value >= 0 else None

    def token_ids(self, key: str) -> tuple[int, ...]:
        """One token id or a list of them (eos_token_id); absent or null: none."""
        value = self.config.get(key)
        if value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        expected = "a token id >= 0, a list of them, or null"
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise self.bad(key, value, expected)
        return tuple(items)

    def require(self, condition: bool, message: str) -> None:
        """A relation between fields (heads divide the hidden size, ...): `message` says which."""
        if not condition:
            raise UserError(f"{self.where}: {message}; {self.fix}")
