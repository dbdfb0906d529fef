"""The model side of a job's resume identity: everything that changes what the model outputs.

It covers the configuration and the tokenizer (every small file of the model folder, by
content: config.json, generation_config.json, tokenizer files), the weights (by the weight
source's fingerprint: per file, its name, size and modification time, so a retrained checkpoint
saved over the old one is seen without reading gigabytes), the compute and storage dtypes, and
the policy fields that change results (weight and cache compression, cache dtype, sparse
attention). Placement percentages, batch sizes and the number of ranks are left out: they change
where tensors live, not the tokens (greedy output is exact), so a run may be resumed with a
policy that fits better.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..planning.placement import Dtypes
from ..planning.policy import Policy
from .model_source import ModelSource

SMALL_FILE = 64 * 2**20  # files above this are weights (or other large data), identified by the source
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def model_fingerprint(source: ModelSource, *, dtypes: Dtypes, policy: Policy) -> str:
    """A hex digest; equal for runs whose outputs are the same."""
    about = {
        "weights": source.weights.fingerprint(),
        "files": _small_files(Path(source.name)),
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


def _small_files(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.endswith(WEIGHT_SUFFIXES) or path.stat().st_size > SMALL_FILE:
            continue
        found[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found
