"""The model side of a job's resume identity: everything that changes what the model outputs.

It covers the files that define the model, by content: config.json, generation_config.json, the
weights index, and the tokenizer's files (MODEL_FILES); the weights (by the weight source's
fingerprint: per file, its name, size and modification time, so a retrained checkpoint saved
over the old one is seen without reading gigabytes); the compute and storage dtypes; and the
policy fields that change results (weight and cache compression, cache dtype, sparse
attention). Nothing else in the folder counts: a job may keep its input, its output and that
output's progress files there (which change as it runs) and still resume. Placement
percentages, batch sizes and the number of ranks are left out: they change where tensors live,
not the tokens (greedy output is exact), so a run may be resumed with a policy that fits better.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from ..planning.placement import Dtypes
from ..planning.policy import Policy
from ..api.model_source import ModelSource

# What transformers reads from a model folder to build the model, its generation defaults and
# its tokenizer (fast or sentencepiece, with a chat template in a file of its own or not).
MODEL_FILES = re.compile(
    r"(config|generation_config|model\.safetensors\.index|special_tokens_map|added_tokens|preprocessor_config)\.json"
    r"|tokenizer[\w.-]*\.(json|model)|vocab[\w.-]*\.(json|txt)|merges[\w.-]*\.txt|[\w.-]*\.model"
    r"|chat_template\.(jinja|json)")
JOB_FILES = re.compile(r"\.run\.json$|\.partial$|\.flexgen-tmp\.")  # a job's own, whatever its output's name


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
