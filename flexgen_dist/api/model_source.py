"""What a model is made of before it is placed: its spec, where its weights come from, its tokenizer."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io_errors import file_error
from ..model.checkpoint import CheckpointSource, RandomSource, WeightSource
from ..model.validate import scan_checkpoint
from ..spec.generation import GenerationDefaults, read_generation_config
from ..spec.layout import model_units
from ..spec.model import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    spec: ModelSpec
    weights: WeightSource
    tokenizer: Any | None  # a transformers tokenizer, when the folder has one
    name: str
    generation: GenerationDefaults | None = None  # generation_config.json's defaults; None: the spec's EOS only

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelSource":
        """A local Hugging Face folder: config.json, safetensors weights, tokenizer files if any,
        generation_config.json if any. The spec is what transformers 5 would run: its EOS ids are
        the generation config's where there is one, and a head that config.json ties to the input
        embedding but the checkpoint stores on its own is the stored one (transformers 5 ties
        only when the two are equal, and then either gives the same logits)."""
        spec = ModelSpec.from_dir(model_dir)
        generation = read_generation_config(model_dir, config_eos=spec.eos_token_ids, vocab_size=spec.vocab_size)
        spec = dataclasses.replace(spec, eos_token_ids=generation.eos_token_ids)
        if spec.tie_word_embeddings and "lm_head.weight" in scan_checkpoint(model_dir):
            log.info("%s: config.json ties the head to the input embedding, but the checkpoint holds its own "
                     "lm_head.weight: using it, as transformers 5 does", model_dir)
            spec = dataclasses.replace(spec, tie_word_embeddings=False)
        weights = CheckpointSource(model_dir, model_units(spec))  # every header checked against the config first
        return cls(spec, weights, _load_tokenizer(Path(model_dir)), str(model_dir), generation)

    @classmethod
    def random(cls, config, seed: int = 0) -> "ModelSource":
        """Seeded random weights of a config's shape (benchmarks): explicit, never implied by a path."""
        spec = ModelSpec.from_config(config)
        std = float(spec.raw.get("initializer_range") or 0.02)
        return cls(spec, RandomSource(seed, std), None, f"random {spec.model_type} (seed {seed})")


# A folder whose tokenizer_config names one of these (or none) is a plain tokenizers-library
# tokenizer: loaded directly, without AutoTokenizer importing the model's configuration modules
# (3-4 s of every run's start on the development machines, against 1 s).
_PLAIN_TOKENIZERS = (None, "PreTrainedTokenizerFast", "TokenizersBackend")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_RESTORE = "restore the tokenizer files from the checkpoint (or delete them all to run on token ids only)"


def _load_tokenizer(model_dir: Path):
    """The folder's tokenizer, or None without tokenizer files. A damaged file is a one-line
    UserError naming it: its JSON is checked here (file, line, column), and whatever else the
    tokenizers library refuses is reported with the folder and its reason."""
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        return None
    for name in _TOKENIZER_JSON:
        _check_json(model_dir / name)
    try:
        if (model_dir / "tokenizer.json").is_file() and _tokenizer_class(model_dir) in _PLAIN_TOKENIZERS:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    except OSError as exc:
        if exc.errno is not None:
            raise file_error(exc, exc.filename or model_dir, "read") from None
        raise UserError(f"cannot load the tokenizer in {str(model_dir)!r}: {_first_line(exc)}; {_RESTORE}") from None
    except Exception as exc:  # the tokenizers library raises plain Exceptions for a file it cannot parse
        raise UserError(f"cannot load the tokenizer in {str(model_dir)!r}: {_first_line(exc)}; {_RESTORE}") from None


def _check_json(path: Path) -> None:
    """A tokenizer JSON file, if present, is UTF-8 JSON holding an object."""
    if not path.is_file():
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise file_error(exc, path, "read") from None
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{str(path)!r} is not UTF-8 text (undecodable byte at offset {exc.start}); {_RESTORE}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{str(path)!r} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                        f"{_RESTORE}") from None
    except RecursionError:
        raise UserError(f"{str(path)!r} is nested too deeply to be a tokenizer file; {_RESTORE}") from None
    if not isinstance(value, dict):
        raise UserError(f"{str(path)!r} holds a JSON {type(value).__name__}, not an object; {_RESTORE}")


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"it has no {exc.args[0]!r} entry" if exc.args else "an entry is missing"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _tokenizer_class(model_dir: Path) -> str | None:
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unknown"  # let AutoTokenizer read it (and report what is wrong with it)
    return config.get("tokenizer_class") if isinstance(config, dict) else "unknown"
