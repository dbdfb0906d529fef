"""What a model is made of before it is placed: its spec, where its weights come from, its tokenizer.

`model_fingerprint`: everything that changes what the model outputs, the part of a job's identity
(jobs/outputs.py `RunIdentity`) that a rerun must match to continue it. It covers the files that
define the model, by content: config.json, generation_config.json, the weights index, and the
tokenizer's files (MODEL_FILES); the weights (by the weight source's fingerprint: per file, its
name, size and modification time, so a retrained checkpoint saved over the old one is seen without
reading gigabytes); the compute and storage dtypes; and the policy fields that change results
(weight and cache compression, cache dtype, sparse attention). Nothing else in the folder counts:
a job may keep its input, its output and that output's progress files there (which change as it
runs) and still resume. Placement percentages, batch sizes and the number of ranks are left out:
they change where tensors live, not the tokens (greedy output is exact), so a run may be resumed
with a policy that fits better.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError, file_error
from ..model.checkpoint import CheckpointSource, RandomSource, WeightSource
from ..model.validate import scan_checkpoint
from ..planning.placement import Dtypes
from ..planning.policy import Policy
from ..spec.checks import GenerationDefaults, read_generation_config
from ..spec.layout import model_units
from ..spec.model import ModelSpec

log = logging.getLogger(__name__)

# What transformers reads from a model folder to build the model, its generation defaults and
# its tokenizer (fast or sentencepiece, with a chat template in a file of its own or not).
MODEL_FILES = re.compile(
    r"(config|generation_config|model\.safetensors\.index|special_tokens_map|added_tokens|preprocessor_config)\.json"
    r"|tokenizer[\w.-]*\.(json|model)|vocab[\w.-]*\.(json|txt)|merges[\w.-]*\.txt|[\w.-]*\.model"
    r"|chat_template\.(jinja|json)")
JOB_FILES = re.compile(r"\.run\.json$|\.partial$|\.flexgen-tmp\.")  # a job's own, whatever its output's name


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
    def from_path(cls, path: str | Path) -> "ModelSource":
        """A Hugging Face folder, a .gguf file, or a folder holding one .gguf file and no config.json."""
        if Path(path).is_dir() and (Path(path) / "config.json").exists():
            return cls.from_dir(path)
        gguf = _gguf().gguf_file(Path(path))
        if gguf is not None:
            return cls.from_gguf(gguf)
        if Path(path).is_file():
            raise UserError(f"--model {str(path)!r} is a file but not a GGUF file; pass a Hugging Face model folder "
                            "or a .gguf file")
        return cls.from_dir(path)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "ModelSource":
        """A GGUF file (llama.cpp, Ollama, LM Studio): the configuration and the tokenizer from its
        metadata as transformers' GGUF loader reads them, the weights from its tensors (see
        model/gguf.py GGUFSource: Q4_0, Q4_1 and Q8_0 matrices stay groups, exactly)."""
        path = Path(path)
        gguf = _gguf()
        header, config = gguf.read_config(path)
        spec = ModelSpec.from_config(_config_object(config), where=repr(str(path)))
        heads = (config.get("num_attention_heads"), config.get("num_key_value_heads"))
        weights = gguf.GGUFSource(header, model_units(spec), spec.num_layers,
                                  heads if header.architecture == "llama" and None not in heads else None)
        spec = dataclasses.replace(spec, dtype=weights.dtype, stored_groups=weights.stored_groups)
        if weights.stored_groups is not None:
            log.info("%s: %d weight matrices stay %d-bit groups of %d as the file holds them; the rest are %s",
                     path, len(weights.stored_groups.keys), weights.stored_groups.bits,
                     weights.stored_groups.group_size, spec.dtype)
        tokenizer = _load_gguf_tokenizer(path) if "tokenizer.ggml.tokens" in header.metadata else None
        generation = GenerationDefaults(spec.eos_token_ids, source="the GGUF metadata")
        return cls(spec, weights, tokenizer, str(path), generation)

    @classmethod
    def random(cls, config, seed: int = 0) -> "ModelSource":
        """Seeded random weights of a config's shape (benchmarks): explicit, never implied by a path."""
        spec = ModelSpec.from_config(config)
        std = float(spec.raw.get("initializer_range") or 0.02)
        return cls(spec, RandomSource(seed, std), None, f"random {spec.model_type} (seed {seed})")


def _gguf():
    """model/gguf.py, imported here and nowhere else: a run of a Hugging Face folder loads no GGUF code."""
    from ..model import gguf

    return gguf


def _config_object(config: dict):
    """The transformers config of that dict, with its class's defaults (as AutoConfig makes it)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def _load_gguf_tokenizer(path: Path):
    """The tokenizer of a GGUF file's metadata, as transformers builds it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except OSError as exc:
        if exc.errno is not None:
            raise file_error(exc, exc.filename or path, "read") from None
        raise UserError(f"cannot build the tokenizer of {str(path)!r}: {_first_line(exc)}") from None
    except Exception as exc:  # transformers raises what its converters raise
        raise UserError(f"cannot build the tokenizer of {str(path)!r}: {_first_line(exc)}") from None


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


def model_fingerprint(source: ModelSource, *, dtypes: Dtypes, policy: Policy) -> str:
    """A hex digest; equal for runs whose outputs are the same."""
    about = {
        "weights": source.weights.fingerprint(),
        "files": model_file_hashes(Path(source.name)),
        "dtypes": {"compute": dtypes.compute, "storage": dtypes.storage},
        "compression": {
            "compress_weight": policy.compress_weight,
            "compress_cache": policy.compress_cache,
            "compression": dataclasses.asdict(policy.compression),
            "cache_dtype": policy.cache_dtype,
            "attn_sparsity": policy.attn_sparsity,
        },
    }
    if not about["files"]:  # not a folder (a generated source): its config stands for it
        about["config"] = source.spec.raw
    return hashlib.sha256(json.dumps(about, sort_keys=True, default=str).encode()).hexdigest()


def model_file_hashes(folder: Path) -> dict[str, str]:
    """The sha256 of each file of the folder that defines the model (MODEL_FILES)."""
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.iterdir()):
        if JOB_FILES.search(path.name) or not MODEL_FILES.fullmatch(path.name) or not path.is_file():
            continue
        found[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found
