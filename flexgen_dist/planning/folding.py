"""A rank's units with identical decoder layers folded into one, so the search can plan fast.

Planning all 80 layers of a rank takes tens of milliseconds, and the search plans thousands of
candidates. Every decoder layer of a model has the same shapes, and a policy puts each of them
on the same tiers, so one representative stands for all of them: the placement of the
representatives (`FoldedRank.plan`) with each layer's bytes counted `repeats` times gives the
whole rank's bytes EXACTLY (`FoldedRank.bytes_per_tier`; working buffers are maxima over layers,
equal for equal layers), and the cost model prices it with the same `repeats`.
tests/test_search.py checks both against the unfolded placement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..spec.layout import Unit
from .place import plan_placement
from .placement import Buffers, Dtypes, Placement, Tier, Workload
from .policy import Policy
from ..spec.model import ModelSpec


def _shape_key(unit: Unit) -> tuple:
    return unit.kind, tuple((ws.name, ws.shape) for ws in unit.weights)


@dataclass(frozen=True)
class FoldedRank:
    spec: ModelSpec
    units: tuple[Unit, ...]  # the rank's units, all of them
    representatives: tuple[Unit, ...]  # the first of each run of identical units
    repeats: dict[int, int]  # representative's layer_idx -> units it stands for

    @classmethod
    def of(cls, spec: ModelSpec, units: Sequence[Unit]) -> "FoldedRank":
        """Fold runs of consecutive identical units (a rank's decoder layers)."""
        units = tuple(units)
        if not units:
            raise ValueError("a rank holds at least one unit")
        reps, repeats = [], {}
        for unit in units:
            if reps and _shape_key(reps[-1]) == _shape_key(unit):
                repeats[reps[-1].layer_idx] += 1
            else:
                reps.append(unit)
                repeats[unit.layer_idx] = 1
        return cls(spec, units, tuple(reps), repeats)

    @property
    def num_layers(self) -> int:
        return len(self.units)

    def plan(self, policy: Policy, *, dtypes: Dtypes, workload: Workload, buffers: Buffers) -> Placement:
        """The placement of the representatives (price it with `repeats`)."""
        return plan_placement(self.spec, self.representatives, policy, dtypes=dtypes, workload=workload, buffers=buffers)

    def plan_all(self, policy: Policy, *, dtypes: Dtypes, workload: Workload, buffers: Buffers) -> Placement:
        """The placement of every unit, as the engine will use it."""
        return plan_placement(self.spec, self.units, policy, dtypes=dtypes, workload=workload, buffers=buffers)

    def bytes_per_tier(self, folded: Placement) -> dict[Tier, int]:
        """The whole rank's `bytes_per_tier()` from the placement of its representatives."""
        out = folded.bytes_per_tier()
        for unit in self.representatives:
            extra = self.repeats[unit.layer_idx] - 1
            if extra == 0:
                continue
            for w in folded.weights[unit.layer_idx]:
                out[w.tier] += extra * folded.weight_footprint(w)
            if unit.has_cache:
                for batch_idx in range(folded.policy.num_gpu_batches):
                    c = folded.caches[(unit.layer_idx, batch_idx)]
                    for which in ("k", "v"):
                        out[c.tier(which)] += extra * folded.cache_footprint(c, which) * folded.blocks_in_flight
        return out
