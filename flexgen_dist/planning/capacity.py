"""Fit a policy's percentages to per-rank memory capacities (no torch).

A greedy fit, not the cost-model search: weights go to the gpu tier while they fit, then the KV
cache; then weights to the cpu tier, then the cache; disk takes the rest. Every candidate is
checked against the exact bytes of its placement (planning/placement.py), working buffers
included, so a fitted policy never plans more than the capacities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError
from .placement import Placement, Tier
from .policy import Policy
from .sizes import format_size


@dataclass(frozen=True)
class Capacity:
    gpu_mem: int  # bytes this rank may use on the gpu tier
    cpu_mem: int  # bytes this rank may use on the cpu tier

    def __post_init__(self) -> None:
        if self.gpu_mem < 0 or self.cpu_mem < 0:
            raise UserError("memory capacities must be >= 0")


def _largest(fits: Callable[[float], bool], upper: float) -> float:
    """The largest percentage in 0.1 steps up to `upper` for which `fits` holds (0 if none), by
    bisection: more on a tier never frees memory there, so `fits` only turns false once."""
    lo, hi = 0, int(round(upper * 10))
    if fits(hi / 10):
        return hi / 10
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid / 10) else (lo, mid)
    return lo / 10


def fit_policy(base: Policy, capacity: Capacity, build: Callable[[Policy], Placement]) -> Policy:
    """The policy with the most on the gpu tier, then on the cpu tier, that fits `capacity`.

    build: the placement of a policy on this rank (the caller fixes units, dtypes, workload)."""

    def used(policy: Policy, tier: Tier) -> int:
        return build(policy).bytes_per_tier(estimates=False)[tier]

    p = base.replace(w_gpu_percent=0.0, w_cpu_percent=0.0, cache_gpu_percent=0.0, cache_cpu_percent=0.0,
                     act_gpu_percent=100.0, act_cpu_percent=0.0)
    floor = used(p, Tier.GPU)
    if floor > capacity.gpu_mem:
        raise UserError(
            f"--gpu-mem {format_size(capacity.gpu_mem)} is below this rank's working set of {format_size(floor)} "
            "(weight slots, KV scratch and a block's activations); raise --gpu-mem, lower the batch or the prefetch depth"
        )
    gpu_fits = lambda policy: used(policy, Tier.GPU) <= capacity.gpu_mem  # noqa: E731
    cpu_fits = lambda policy: used(policy, Tier.CPU) <= capacity.cpu_mem  # noqa: E731
    p = p.replace(w_gpu_percent=_largest(lambda x: gpu_fits(p.replace(w_gpu_percent=x)), 100.0))
    p = p.replace(cache_gpu_percent=_largest(lambda x: gpu_fits(p.replace(cache_gpu_percent=x)), 100.0))
    p = p.replace(w_cpu_percent=_largest(lambda x: cpu_fits(p.replace(w_cpu_percent=x)), 100.0 - p.w_gpu_percent))
    p = p.replace(cache_cpu_percent=_largest(lambda x: cpu_fits(p.replace(cache_cpu_percent=x)), 100.0 - p.cache_gpu_percent))
    return p
