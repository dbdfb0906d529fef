"""The throughput a policy can reach on this machine, from the cost model: what a measured run is
held against.

For one block, the cost model (planning/cost_model.py) prices every task (one token step over all
the layers) as two sums over the layers: the compute path (matmuls and attention at the profiled
flop rates, and without a GPU the host copies, which then run on the compute cores) and the load
path (disk reads at the profiled disk bandwidth, and with a GPU the host-to-device link). With
overlap the paths run side by side, so no schedule does a step faster than the larger of the two
(without overlap, their sum): that per-step time is the bound. The cost model's own prediction
takes the larger of the two per layer instead, and is at or above the bound (`predicted_*`).

The bound is computed in the bench's process from the policy the child reports in its stats
JSON, rebuilt into a placement with the dtypes, workload and buffer settings the child plans with
(the compute dtype it ran in, the checkpoint's dtype stored), and the machine's profiled
`Hardware` for that compute dtype (`flexgen_dist.profile`, measured once and cached per dtype);
`BoundModels` keeps one per compute dtype.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..planning.compression import CompressionConfig
from ..planning.cost_model import TaskTime, estimate
from ..machine.hardware import Hardware
from ..planning.layout import Unit, model_units
from ..planning.place import plan_placement
from ..planning.placement import Buffers, Dtypes, Placement, Workload
from ..planning.policy import Policy
from ..planning.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bound:
    """The bound of one policy on one machine for one block (tokens/s as `Stats` counts them)."""

    prefill_tokens_per_s: float  # prompt tokens of the block / the prefill step's bound
    decode_tokens_per_s: float | None  # block * (gen_len - 1) / the decode steps' bounds (None: gen_len 1)
    limiter: str  # what the decode steps wait for, summed over them: "compute" or "load"
    decode_compute_s: float  # the decode steps' compute paths, summed
    decode_load_s: float  # ... and their load paths
    predicted_decode_tokens_per_s: float | None  # the cost model's estimate (larger path per layer)
    predicted_block_s: float  # the cost model's latency of the block, prefill to last token

    def fraction(self, measured_decode_tokens_per_s: float) -> float | None:
        """Measured decode throughput / the bound (None without a decode bound)."""
        if not self.decode_tokens_per_s:
            return None
        return measured_decode_tokens_per_s / self.decode_tokens_per_s

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def policy_from_stats(policy: dict) -> Policy:
    """The `Policy` a run used, from the "policy" object of its `--stats-json` file.

    A field this version does not know is refused (ValueError): a bound silently computed without
    it would be a bound for another policy."""
    fields = dict(policy)
    known = {f.name for f in dataclasses.fields(Policy)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"the run's policy has fields this bench does not know: {', '.join(unknown)}")
    if isinstance(fields.get("compression"), dict):
        fields["compression"] = CompressionConfig(**fields["compression"])
    return Policy(**fields)


def _step_s(task: TaskTime, overlap: bool) -> float:
    return max(task.compute_s, task.load_s) if overlap else task.compute_s + task.load_s


@dataclass(frozen=True)
class BoundModel:
    """Everything but the policy that the child plans with; built once per bench invocation."""

    spec: ModelSpec
    units: tuple[Unit, ...]
    dtypes: Dtypes
    workload: Workload
    buffers: Buffers
    hardware: Hardware
    hardware_source: str  # which profile (file) or --hardware the speeds came from, for the output

    def placement(self, policy: Policy) -> Placement:
        return plan_placement(self.spec, self.units, policy, dtypes=self.dtypes, workload=self.workload,
                              buffers=self.buffers)

    def bound(self, policy: Policy) -> Bound:
        block = policy.block_size
        est = estimate(self.placement(policy), self.hardware, num_prompts=block)
        tasks = est.stages[0].tasks()
        prefill_s = _step_s(tasks[0], policy.overlap)
        decode = tasks[1:]
        decode_s = sum(_step_s(t, policy.overlap) for t in decode)
        compute_s = sum(t.compute_s for t in decode)
        load_s = sum(t.load_s for t in decode)
        decode_tokens = block * (self.workload.gen_len - 1)
        return Bound(
            prefill_tokens_per_s=block * self.workload.prompt_len / prefill_s,
            decode_tokens_per_s=decode_tokens / decode_s if decode else None,
            limiter="compute" if compute_s >= load_s else "load",
            decode_compute_s=compute_s,
            decode_load_s=load_s,
            predicted_decode_tokens_per_s=decode_tokens / est.decode_s if decode else None,
            predicted_block_s=est.block_s,
        )


class BoundModels:
    """One `BoundModel` per compute dtype, each built the first time a run in that dtype asks."""

    def __init__(self, build: Callable[[str | None], BoundModel],
                 on_build: Callable[[str | None, BoundModel], None] | None = None):
        self._build = build
        self._on_build = on_build
        self.built: dict[str | None, BoundModel] = {}

    def for_dtype(self, compute_dtype: str | None) -> BoundModel:
        """The bound model of runs computing in `compute_dtype` (None: the engine's default)."""
        if compute_dtype not in self.built:
            self.built[compute_dtype] = model = self._build(compute_dtype)
            if self._on_build is not None:
                self._on_build(compute_dtype, model)
        return self.built[compute_dtype]


def build_bound_model(model_dir: str | Path, *, prompt_len: int, gen_len: int, offload_dir: str | Path,
                      hardware: str | Path | None = None, compute_dtype: str | None = None) -> BoundModel:
    """The child's planning inputs (see the module docstring) and this machine's speeds: the
    `--hardware` file or preset when given, else the cached profile of this host, device, compute
    dtype and offload file system, measured now (a quick profile, seconds) when there is none.
    `compute_dtype`: what the child computed in (None: the engine's default rule)."""
    from ..api.runtime import Runtime  # torch: the device and dtype rules the child follows
    from ..machine.presets import hardware_from_arg
    from ..profile import cache_path, load_or_profile

    spec = ModelSpec.from_dir(model_dir)
    runtime = Runtime(compute_dtype=compute_dtype)
    device = runtime.resolve_device()
    dtypes = runtime.dtypes(spec, device)
    buffers = Buffers(separate_gpu=device.type == "cuda", prefetch_depth=runtime.prefetch_depth,
                      io_threads=runtime.disk_io.threads, chunk_bytes=runtime.disk_io.chunk_bytes)
    if hardware is not None:
        machine, source = hardware_from_arg(hardware), f"--hardware {hardware}"
    else:
        path = cache_path(device.type, dtypes.compute, offload_dir)
        fresh = not path.exists()
        machine = load_or_profile(device.type, offload_dir, compute_dtype=dtypes.compute)
        source = f"profile {path}" + (" (measured now: quick)" if fresh else "")
    return BoundModel(spec=spec, units=tuple(model_units(spec)), dtypes=dtypes,
                      workload=Workload(prompt_len, gen_len), buffers=buffers, hardware=machine,
                      hardware_source=source)
