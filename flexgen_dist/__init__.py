"""flexgen_dist: high-throughput batch generation with LLMs larger than GPU memory.

    from flexgen_dist import LLM, Policy
    llm = LLM("path/to/hf_dir", policy=Policy(gpu_batch_size=4, num_gpu_batches=2), offload_dir="offload")
    result = llm.generate(["Hello"], max_new_tokens=32)

The names below are imported on first use, so `import flexgen_dist.spec`, `flexgen_dist.planning`
and `flexgen_dist.schedule` work without torch.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from .errors import NotSupportedYet, UserError

__version__ = "0.1.0"

DEFAULT_MODEL = str(Path(__file__).parent / "models" / "default")

_LAZY = {
    "LLM": ".api.llm",
    "GenerationResult": ".api.results",
    "Output": ".api.results",
    "Stats": ".api.results",
    "ModelSource": ".api.model_source",
    "Runtime": ".api.runtime",
    "Capacity": ".api.planner",
    "SearchOptions": ".planning.search",
    "ModelSpec": ".spec.model",
    "Policy": ".planning.policy",
    "Workload": ".planning.placement",
    "Pipeline": ".parallel.group",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_MODEL", "NotSupportedYet", "UserError", "__version__", *_LAZY]
