"""What a model is made of before it is placed: its spec, where its weights come from, its tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model.checkpoint import CheckpointSource, RandomSource, WeightSource
from ..planning.layout import model_units
from ..planning.spec import ModelSpec


@dataclass(frozen=True)
class ModelSource:
    spec: ModelSpec
    weights: WeightSource
    tokenizer: Any | None  # a transformers tokenizer, when the folder has one
    name: str

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelSource":
        """A local Hugging Face folder: config.json, safetensors weights, tokenizer files if any."""
        spec = ModelSpec.from_dir(model_dir)
        weights = CheckpointSource(model_dir, model_units(spec))  # every header checked against the config first
        return cls(spec, weights, _load_tokenizer(Path(model_dir)), str(model_dir))

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


def _load_tokenizer(model_dir: Path):
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    if (model_dir / "tokenizer.json").is_file() and _tokenizer_class(model_dir) in _PLAIN_TOKENIZERS:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _tokenizer_class(model_dir: Path) -> str | None:
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unknown"  # let AutoTokenizer read it (and report what is wrong with it)
    return config.get("tokenizer_class") if isinstance(config, dict) else "unknown"
