"""Which decoder layers each pipeline stage holds: pure functions of numbers (no torch).

Stage s holds a contiguous slice of decoder layers. The pipeline runs at the pace of its slowest
stage, so the split minimises the largest stage cost, where stage 0 also pays for the embedding
(`first_extra`) and the last stage for the final norm and head (`last_extra`). Among the splits
with that smallest maximum it takes the one with the smallest sum of squared stage costs (the
most even one), so 10 equal layers over 4 stages give 3,3,2,2 rather than 3,3,3,1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flexgen_dist.errors import UserError


def partition_layers(
    layer_costs: Sequence[float],
    num_stages: int,
    *,
    first_extra: float = 0.0,
    last_extra: float = 0.0,
    override: Sequence[int] | None = None,
) -> list[range]:
    """Split layers 0..len(layer_costs)-1 into `num_stages` contiguous, non-empty slices.

    layer_costs: cost of each decoder layer (time or bytes; only ratios matter), each >= 0.
    num_stages: number of pipeline stages (= ranks).
    first_extra / last_extra: cost of the embedding on stage 0 / of the head on the last stage.
    override: layers per stage as given by the user (`--stage-layers 10,12,10`); used as is once
        checked.
    Returns one `range` of layer indices per stage, in stage order.
    """
    num_layers = len(layer_costs)
    if num_layers == 0:
        raise UserError("the model has no decoder layers to split over ranks")
    if num_stages < 1:
        raise UserError(f"number of pipeline stages is {num_stages}: it must be at least 1")
    if num_stages > num_layers:
        raise UserError(
            f"{num_layers} layers cannot be split over {num_stages} ranks: use at most {num_layers} ranks"
        )
    for name, value in (("first_extra", first_extra), ("last_extra", last_extra)):
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{name}={value} must be a finite cost >= 0")
    for layer_idx, cost in enumerate(layer_costs):
        if not math.isfinite(cost) or cost < 0:
            raise UserError(f"cost of layer {layer_idx} is {cost}: layer costs must be finite and >= 0")

    if override is not None:
        return _ranges(_check_override(override, num_layers, num_stages))
    if num_stages == 1:
        return [range(0, num_layers)]

    prefix = [0.0]  # prefix[i] = cost of layers [0, i)
    for cost in layer_costs:
        prefix.append(prefix[-1] + float(cost))
    extras = [0.0] * num_stages
    extras[0] += float(first_extra)
    extras[-1] += float(last_extra)
    costs = _StageCosts(prefix, extras)
    best_max = _min_max_stage_cost(costs, num_layers, num_stages)
    return _ranges(_most_even_split(costs, num_layers, num_stages, best_max))


def _check_override(override: Sequence[int], num_layers: int, num_stages: int) -> list[int]:
    counts = list(override)
    shown = ",".join(str(count) for count in counts)
    if len(counts) != num_stages:
        raise UserError(
            f"--stage-layers {shown} gives {len(counts)} stages but there are {num_stages} ranks: "
            f"give one layer count per rank"
        )
    for stage_idx, count in enumerate(counts):
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise UserError(
                f"--stage-layers {shown}: entry {stage_idx} is {count!r}, every rank needs a positive number of layers"
            )
    if sum(counts) != num_layers:
        raise UserError(
            f"--stage-layers {shown} sums to {sum(counts)} but the model has {num_layers} decoder layers"
        )
    return counts


def _ranges(counts: Sequence[int]) -> list[range]:
    out, start = [], 0
    for count in counts:
        out.append(range(start, start + count))
        start += count
    return out


class _StageCosts:
    """The one expression for a stage's cost, shared by the candidates, the feasibility check and
    the final DP, so comparisons against the optimum are exact in floating point."""

    def __init__(self, prefix: list[float], extras: list[float]):
        self.prefix, self.extras = prefix, extras

    def segment(self, start: int, end: int) -> float:
        return self.prefix[end] - self.prefix[start]

    def __call__(self, start: int, end: int, stage_idx: int) -> float:
        # A middle stage adds 0.0, so its cost is bit for bit segment(start, end).
        return self.segment(start, end) + self.extras[stage_idx]


def _min_max_stage_cost(stage_cost: _StageCosts, num_layers: int, num_stages: int) -> float:
    """The smallest achievable maximum stage cost: binary search over every possible stage cost."""
    # The optimum is the cost of some stage: of stage 0 (with the embedding), of the last stage
    # (with the head), or of a middle stage, whose cost is a plain segment sum. A superset of the
    # candidates is harmless: the search returns the smallest feasible one.
    last = num_stages - 1
    candidates = {stage_cost(0, end, 0) for end in range(1, num_layers + 1)}
    candidates |= {stage_cost(start, num_layers, last) for start in range(num_layers)}
    candidates |= {
        stage_cost.segment(start, end) for start in range(num_layers) for end in range(start + 1, num_layers + 1)
    }
    ordered = sorted(candidates)
    low, high = 0, len(ordered) - 1  # the largest candidate is always feasible
    while low < high:
        mid = (low + high) // 2
        if _fits(stage_cost, num_layers, num_stages, ordered[mid]):
            high = mid
        else:
            low = mid + 1
    return ordered[low]


def _fits(stage_cost: _StageCosts, num_layers: int, num_stages: int, limit: float) -> bool:
    """Can every stage stay within `limit`? Greedy: each stage takes as many layers as it can.

    Taking the longest prefix that fits is optimal because costs are >= 0: a stage that ends later
    never leaves the next stages worse off.
    """
    start = 0
    for stage_idx in range(num_stages):
        latest_end = num_layers - (num_stages - 1 - stage_idx)  # leave a layer for each later stage
        end = start
        while end < latest_end and stage_cost(start, end + 1, stage_idx) <= limit:
            end += 1
        if end == start:
            return False
        start = end
    return start == num_layers


def _most_even_split(stage_cost: _StageCosts, num_layers: int, num_stages: int, limit: float) -> list[int]:
    """Among splits with every stage within `limit`, the one with the least sum of squared costs.

    DP over (stage, end layer); a tie goes to the earliest split point, so the result is deterministic.
    """
    inf = math.inf
    # best[end]: least sum of squared costs of stages 0..stage_idx covering layers [0, end);
    # back[stage_idx][end]: where that stage starts in it.
    best = [inf] * (num_layers + 1)
    best[0] = 0.0
    back: list[list[int]] = []
    for stage_idx in range(num_stages):
        new_best = [inf] * (num_layers + 1)
        choice = [-1] * (num_layers + 1)
        first_end = stage_idx + 1
        last_end = num_layers - (num_stages - 1 - stage_idx)
        for end in range(first_end, last_end + 1):
            for start in range(end - 1, stage_idx - 1, -1):  # cost grows as start moves left
                cost = stage_cost(start, end, stage_idx)
                if cost > limit:
                    break
                if best[start] == inf:
                    continue
                total = best[start] + cost * cost
                if total <= new_best[end]:  # on a tie the leftmost start wins
                    new_best[end], choice[end] = total, start
        best = new_best
        back.append(choice)
    assert best[num_layers] < inf, "the min-max limit must admit a split"
    counts, end = [], num_layers
    for stage_idx in reversed(range(num_stages)):
        start = back[stage_idx][end]
        counts.append(end - start)
        end = start
    return counts[::-1]
