"""Fit a policy's percentages to per-rank memory capacities (no torch).

A greedy fit, not the cost-model search: weights go to the gpu tier while they fit, then to the
cpu tier, then to disk; the KV cache takes what is left on gpu, then cpu, then disk. It is what
`--gpu-mem` / `--cpu-mem` mean until the linear-program search replaces it, and it always leaves
room for the working set: the layers' weights in the compute dtype that are in memory at once
(the one computing and the prefetched ones: double buffering counted) and a block's activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError
from .policy import Policy
from .sizes import format_size


@dataclass(frozen=True)
class StageFootprint:
    """Sizes of what one rank holds."""

    weight_numel: int  # all weights of the rank's layers
    max_unit_numel: int  # the largest layer's weights (a prefetch buffer holds one)
    compute_itemsize: int  # bytes per value on the gpu tier
    storage_itemsize: int  # bytes per value on the cpu and disk tiers
    cache_bytes: int  # KV cache of every block in flight on this rank
    act_bytes: int  # hidden states of one block
    buffered_layers: int = 2  # layers of weights in the compute dtype at once: computing + prefetched


@dataclass(frozen=True)
class Fit:
    policy: Policy
    working_bytes: int  # reserved on the gpu tier for buffers and activations


def _percent(part: float, whole: float) -> float:
    if whole <= 0:
        return 100.0
    return math.floor(max(0.0, min(1.0, part / whole)) * 1000) / 10  # round down to 0.1 %


def fit_policy(base: Policy, fp: StageFootprint, gpu_mem: int, cpu_mem: int) -> Fit:
    working = fp.buffered_layers * fp.max_unit_numel * fp.compute_itemsize + fp.act_bytes
    if gpu_mem < working:
        raise UserError(
            f"--gpu-mem {format_size(gpu_mem)} is below this rank's working set of {format_size(working)} "
            "(prefetch buffers and a block's activations); raise --gpu-mem, lower the batch or the prefetch depth"
        )
    gpu_free = float(gpu_mem - working)
    w_gpu_bytes = fp.weight_numel * fp.compute_itemsize
    w_gpu = _percent(gpu_free, w_gpu_bytes)
    gpu_free -= w_gpu / 100 * w_gpu_bytes
    cache_gpu = _percent(gpu_free, fp.cache_bytes)
    cpu_free = float(cpu_mem)
    w_cpu_bytes = fp.weight_numel * fp.storage_itemsize
    w_cpu = min(100.0 - w_gpu, _percent(cpu_free, w_cpu_bytes))
    cpu_free -= w_cpu / 100 * w_cpu_bytes
    cache_cpu = min(100.0 - cache_gpu, _percent(cpu_free, fp.cache_bytes))
    policy = base.replace(
        w_gpu_percent=w_gpu,
        w_cpu_percent=w_cpu,
        cache_gpu_percent=cache_gpu,
        cache_cpu_percent=cache_cpu,
        act_gpu_percent=100.0,
        act_cpu_percent=0.0,
    )
    return Fit(policy, working)
