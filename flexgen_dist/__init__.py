"""flexgen_dist: high-throughput batch generation with LLMs larger than GPU memory.

    from flexgen_dist import LLM, Policy
    llm = LLM("path/to/hf_dir", policy=Policy(gpu_batch_size=4, num_gpu_batches=2), offload_dir="offload")
    result = llm.generate(["Hello"], max_new_tokens=32)
"""

from pathlib import Path

from .errors import NotSupportedYet, UserError
from .frontend.api import LLM, GenerationResult, Output, Stats
from .planning.policy import Policy
from .planning.spec import ModelSpec

DEFAULT_MODEL = str(Path(__file__).parent / "models" / "default")

__all__ = [
    "DEFAULT_MODEL",
    "LLM",
    "GenerationResult",
    "ModelSpec",
    "NotSupportedYet",
    "Output",
    "Policy",
    "Stats",
    "UserError",
]
