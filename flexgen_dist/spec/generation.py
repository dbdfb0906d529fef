"""A checkpoint's `generation_config.json`, read as transformers 5 reads it (no torch).

What transformers 5.x does (checked against 5.24 on a tiny Llama: `from_pretrained` then
`generate` with no arguments):
- With the file, its `eos_token_id` (one id or a list) is the whole set of EOS ids: config.json's
  is not added (a file with no `eos_token_id` means no EOS). Llama-3-Instruct's end-of-turn token
  is in that list only, so a reader of config.json alone runs past the end of every answer.
- Without the file, config.json's `eos_token_id` holds.
- `do_sample`, `temperature`, `top_k` and `top_p` in the file are the defaults of `generate`;
  what the caller gives wins.
A damaged file (not JSON, a field of the wrong type, an id outside the vocabulary) is one line
naming the file and the field, never a guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .checks import ConfigFields, describe, read_config_file

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
