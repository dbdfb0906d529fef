"""Typed reads of a Hugging Face config.json: a wrong value is one line, never a traceback.

`int("64")` would quietly accept a string and `bool("false")` is True, so nothing here converts:
a field holds the JSON type it should or the user hears about it, with the file, the field, the
value as written and what is expected. A field that is absent (or null, for an optional one)
takes transformers' default, so real checkpoints that leave fields out still load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError, file_error

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


# --- A checkpoint's `generation_config.json`, read as transformers 5 reads it (no torch).
# 
# What transformers 5.x does (checked against 5.24 on a tiny Llama: `from_pretrained` then
# `generate` with no arguments):
# - With the file, its `eos_token_id` (one id or a list) is the whole set of EOS ids: config.json's
#   is not added (a file with no `eos_token_id` means no EOS). Llama-3-Instruct's end-of-turn token
#   is in that list only, so a reader of config.json alone runs past the end of every answer.
# - Without the file, config.json's `eos_token_id` holds.
# - `do_sample`, `temperature`, `top_k` and `top_p` in the file are the defaults of `generate`;
#   what the caller gives wins.
# A damaged file (not JSON, a field of the wrong type, an id outside the vocabulary) is one line
# naming the file and the field, never a guess.

NAME = "generation_config.json"
_RESTORE = f"restore the checkpoint's {NAME} (or delete it to use config.json's eos_token_id)"


@dataclass(frozen=True)
class GenerationDefaults:
    """What a model folder says about generating. None: the folder does not say (the built-in
    default holds: greedy, temperature 1, top-k off, top-p 1)."""

    eos_token_ids: tuple[int, ...]
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    source: str = "config.json"  # where the EOS ids came from, for the settings line

    def sampling(self, *, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None) -> dict:
        """The sampling settings of a run: each one the caller's where given, else this file's,
        else the built-in default; and `from_file`, the names that came from the file."""
        given = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p}
        built_in = {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
        settings, from_file = {}, []
        for name, value in given.items():
            if value is None and getattr(self, name) is not None:
                value = getattr(self, name)
                from_file.append(name)
            settings[name] = built_in[name] if value is None else value
        if not settings["do_sample"]:  # greedy: the file's temperature and cut-offs do not apply
            from_file = [name for name in from_file if name == "do_sample"]
            settings.update({name: built_in[name] for name in ("temperature", "top_k", "top_p") if given[name] is None})
        return {**settings, "from_file": tuple(from_file)}


def read_generation_config(model_dir: str | Path, *, config_eos: tuple[int, ...], vocab_size: int) -> GenerationDefaults:
    """The folder's generation defaults; `config_eos` (config.json's EOS ids) when it has no file."""
    path = Path(model_dir) / NAME
    if not path.exists():
        return GenerationDefaults(eos_token_ids=config_eos)
    if not path.is_file():
        raise UserError(f"{str(path)!r} is not a regular file; {_RESTORE}")
    where = repr(str(path))
    fields = ConfigFields(read_config_file(path, restore=_RESTORE), where, "generation", fix=_RESTORE)
    eos = fields.token_ids("eos_token_id")
    outside = [i for i in eos if i >= vocab_size]
    if outside:
        raise UserError(f"{where}: eos_token_id {outside[0]} is outside the model's vocabulary (ids 0 to "
                        f"{vocab_size - 1}); {_RESTORE}")
    do_sample = _optional(fields, "do_sample", lambda v: isinstance(v, bool), "true or false")
    temperature = _optional(fields, "temperature", _finite_at_least(0.0), "a finite number >= 0")
    top_k = _optional(fields, "top_k", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                      "a whole number >= 0 (0: off)")
    top_p = _optional(fields, "top_p", lambda v: _finite_at_least(0.0)(v) and 0 < v <= 1, "a number in (0, 1]")
    if do_sample and temperature == 0:
        raise UserError(f"{where}: do_sample is true with temperature 0, which transformers refuses too; "
                        f"{_RESTORE}")
    return GenerationDefaults(eos_token_ids=eos, do_sample=do_sample,
                              temperature=None if temperature is None else float(temperature),
                              top_k=top_k, top_p=None if top_p is None else float(top_p), source=NAME)


def _finite_at_least(low: float):
    def check(value: Any) -> bool:
        return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
                and value >= low)

    return check


def _optional(fields: ConfigFields, key: str, valid, expected: str):
    value = fields.config.get(key)
    if value is None:
        return None
    if not valid(value):
        raise UserError(f"{fields.where}: {key!r} is {describe(value)}, expected {expected}; {_RESTORE}")
    return value
