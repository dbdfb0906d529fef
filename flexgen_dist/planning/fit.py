"""Policies that fit, checked on the exact placement: stepping fractions down to slower tiers,
polishing a fitting policy, and refusing a hand-given policy that cannot fit (no torch).

A policy's percentages only matter through which tensors they put where (planning/placement.py
`choose_tiers`: a tensor goes to the tier whose range holds the midpoint of its cumulative
size). So the percentages of one kind of tensor are a point on a lattice: (how many tensors on
gpu, how many on gpu or cpu), counted in the order of their midpoints. Moves change one count
by one tensor; every candidate is checked with the placement's exact bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError
from .cost_model import DEFAULT_LINK_BW, StageTimes, mean_decode_task, stage_times, task_time
from .place import FoldedRank
from ..machine.hardware import Hardware, MemoryLimit
from .placement import Buffers, Dtypes, Placement, Tier, Workload
from .policy import Policy
from ..sizes import format_size

KINDS = ("w", "cache", "act")
TIDY_STEPS = (100, 50, 25, 20, 10, 5, 2, 1, 0.5, 0.1, 0.05, 0.01, 0.001)
EPS = 1e-6  # percent: keeps a tidy value clear of a midpoint despite float sums
DOWN = ((-1, 0), (0, -1), (-1, -1))  # gpu -> cpu, cpu -> disk, gpu -> disk (one of each shifts down)
UP = ((1, 0), (0, 1), (1, 1))


@dataclass(frozen=True)
class Lattice:
    mids: tuple[float, ...]  # sorted midpoints (percent) of the tensors of one kind

    @staticmethod
    def _mids(sizes: list[int]) -> list[float]:
        """Each tensor's midpoint, computed as placement.choose_tiers computes it."""
        total, acc, out = sum(sizes), 0, []
        for size in sizes:
            out.append((acc + size / 2) / total * 100 if total else 0.0)
            acc += size
        return out

    @classmethod
    def of(cls, mids_per_unit: list[list[float]]) -> "Lattice":
        return cls(tuple(sorted({mid for mids in mids_per_unit for mid in mids})))

    @classmethod
    def of_sizes(cls, sizes_per_unit: list[list[int]]) -> "Lattice":
        return cls.of([cls._mids(sizes) for sizes in sizes_per_unit])

    def positions(self, mids: list[float]) -> list[int]:
        """Where each tensor of a unit (given by its midpoints, `weight_mids`) sits on the lattice."""
        index = {mid: idx for idx, mid in enumerate(self.mids)}
        return [index[mid] for mid in mids]

    def count(self, end: float) -> int:
        """Tensors a boundary at `end` puts below it (the midpoint rule)."""
        return sum(1 for mid in self.mids if mid < end)

    def boundary(self, count: int) -> float:
        """A tidy percentage that puts exactly `count` tensors below it."""
        lo = self.mids[count - 1] + EPS if count > 0 else 0.0
        hi = self.mids[count] - EPS if count < len(self.mids) else 100.0
        middle = (lo + hi) / 2
        for step in TIDY_STEPS:
            first, last = math.ceil(lo / step - 1e-12), math.floor(hi / step + 1e-12)
            if first <= last:
                best = min(range(first, last + 1), key=lambda k: abs(k * step - middle))
                return round(best * step, 6)
        return middle


Point = tuple[tuple[int, int], ...]  # per kind (w, cache, act): (tensors on gpu, tensors on gpu or cpu)


def weight_mids(rank: FoldedRank) -> dict[int, list[float]]:
    """Each representative's tensors' midpoints. A head tied to the input embedding goes where the
    table goes (place.plan_placement), so it takes the table's midpoint: its own is no step."""
    first: dict[str, float] = {}
    out = {}
    for unit in rank.representatives:
        mids = Lattice._mids([ws.numel for ws in unit.weights])
        out[unit.layer_idx] = [first.setdefault(ws.key, mid) for ws, mid in zip(unit.weights, mids)]
    return out


def lattices(rank: FoldedRank, policy: Policy) -> dict[str, Lattice]:
    num_batches = policy.num_gpu_batches
    return {
        "w": Lattice.of(list(weight_mids(rank).values())),
        "cache": Lattice.of_sizes([[1] * (2 * num_batches)]),
        "act": Lattice.of_sizes([[1] * num_batches]),
    }


def to_point(policy: Policy, grids: dict[str, Lattice]) -> Point:
    """The lattice point of a policy: tensors on gpu, and on gpu or cpu, of each kind."""
    out = []
    for kind in KINDS:
        gpu, cpu, _ = policy.percents(kind)
        out.append((grids[kind].count(gpu), grids[kind].count(gpu + cpu)))
    return tuple(out)


def to_policy(point: Point, policy: Policy, grids: dict[str, Lattice]) -> Policy:
    changes = {}
    for kind, (on_gpu, on_fast) in zip(KINDS, point):
        gpu = grids[kind].boundary(on_gpu)
        both = grids[kind].boundary(on_fast) if on_fast > on_gpu else gpu
        changes[f"{kind}_gpu_percent"] = gpu
        changes[f"{kind}_cpu_percent"] = max(0.0, min(both, 100.0) - gpu)
    return policy.replace(**changes)


def moved(point: Point, kind_idx: int, move: tuple[int, int], grids: dict[str, Lattice]) -> Point | None:
    on_gpu, on_fast = point[kind_idx]
    on_gpu, on_fast = on_gpu + move[0], on_fast + move[1]
    if move == (1, 0):
        on_fast = max(on_fast, on_gpu)  # no cpu tensor to promote: one comes up from disk
    if not 0 <= on_gpu <= on_fast <= len(grids[KINDS[kind_idx]].mids):
        return None
    return point[:kind_idx] + ((on_gpu, on_fast),) + point[kind_idx + 1:]


# --- a rank's problem: exact bytes and predicted time of a policy ---------------------------------


class RankProblem:
    """One rank with its settings; plans are cached per policy (the search asks many times)."""

    def __init__(self, rank: FoldedRank, hardware: Hardware, *, dtypes: Dtypes, workload: Workload,
                 buffers: Buffers, link_bw: float = DEFAULT_LINK_BW):
        self.rank, self.hardware = rank, hardware
        self.dtypes, self.workload, self.buffers, self.link_bw = dtypes, workload, buffers, link_bw
        self._plans: dict[Policy, Placement] = {}
        self._bytes: dict[Policy, dict[Tier, int]] = {}

    def plan(self, policy: Policy) -> Placement:
        if policy not in self._plans:
            self._plans[policy] = self.rank.plan(policy, dtypes=self.dtypes, workload=self.workload, buffers=self.buffers)
        return self._plans[policy]

    def bytes(self, policy: Policy) -> dict[Tier, int]:
        if policy not in self._bytes:
            self._bytes[policy] = self.rank.bytes_per_tier(self.plan(policy))
        return self._bytes[policy]

    def shortfalls(self, policy: Policy) -> list[tuple[int, MemoryLimit, int]]:
        return shortfalls(self.bytes(policy), self.hardware)

    def quick_s(self, policy: Policy) -> float:
        """One block's tasks on this rank, the decode steps priced at their mean (fast)."""
        p, reps = self.plan(policy), self.rank.repeats
        prefill = task_time(p, self.hardware, 0, repeats=reps, link_bw=self.link_bw)
        seconds = max(prefill.seconds, prefill.send_s)
        mean = mean_decode_task(p, self.hardware, repeats=reps, link_bw=self.link_bw)
        if mean is not None:
            seconds += (self.workload.gen_len - 1) * max(mean.seconds, mean.send_s)
        return seconds

    def stage(self, policy: Policy) -> StageTimes:
        """Every task, exactly (the folded placement priced with its repeats)."""
        return stage_times(self.plan(policy), self.hardware, repeats=self.rank.repeats, link_bw=self.link_bw,
                           peak_bytes=self.bytes(policy))


def shortfalls(used: dict[Tier, int], hardware: Hardware) -> list[tuple[int, MemoryLimit, int]]:
    """(limit index, limit, bytes needed) of every memory limit the bytes exceed."""
    out = []
    for idx, limit in enumerate(hardware.memory_limits()):
        need = sum(used[Tier(name)] for name in limit.tiers)
        if need > limit.capacity:
            out.append((idx, limit, need))
    return out


def limit_label(idx: int, limit: MemoryLimit) -> str:
    """Hardware.memory_limits() lists one limit per tier, then the host RAM (index 3)."""
    if idx == 3:
        return f"host RAM ({' and '.join(limit.tiers)} tier{'s' if len(limit.tiers) > 1 else ''})"
    return f"{limit.tiers[0]} tier"


# --- stepping down, polishing ---------------------------------------------------------------------


def fit_down(problem: RankProblem, policy: Policy) -> Policy | None:
    """The policy with tensors moved to slower tiers, one at a time, until every limit holds;
    each step frees bytes under the first exceeded limit at the least predicted time. None when
    even everything on disk does not fit (the block shape itself is too big)."""
    grids = lattices(problem.rank, policy)
    point = to_point(policy, grids)
    current = to_policy(point, policy, grids)
    while True:
        short = problem.shortfalls(current)
        if not short:
            return current
        idx, limit, need = short[0]
        best = None
        for kind_idx in range(len(KINDS)):
            for move in DOWN:
                nxt = moved(point, kind_idx, move, grids)
                if nxt is None:
                    continue
                candidate = to_policy(nxt, policy, grids)
                now = sum(problem.bytes(candidate)[Tier(name)] for name in limit.tiers)
                if now < need:
                    key = (problem.quick_s(candidate), now)
                    if best is None or key < best[0]:
                        best = (key, nxt, candidate)
        if best is None:
            return None
        _, point, current = best


def polish(problem: RankProblem, policy: Policy, max_steps: int = 200) -> Policy:
    """Single-tensor moves (up or down, any kind) that still fit and lower the predicted time,
    the best first, until none does: settles what the LP's continuous fractions cannot see."""
    grids = lattices(problem.rank, policy)
    point = to_point(policy, grids)
    current = to_policy(point, policy, grids)
    best_s = problem.quick_s(current)
    for _ in range(max_steps):
        step = None
        for kind_idx in range(len(KINDS)):
            for move in DOWN + UP:
                nxt = moved(point, kind_idx, move, grids)
                if nxt is None:
                    continue
                candidate = to_policy(nxt, policy, grids)
                if problem.shortfalls(candidate):
                    continue
                seconds = problem.quick_s(candidate)
                if seconds < best_s * (1 - 1e-9) and (step is None or seconds < step[0]):
                    step = (seconds, nxt, candidate)
        if step is None:
            break
        best_s, point, current = step
    return current


# --- hand-given policies --------------------------------------------------------------------------


class PolicyDoesNotFit(UserError):
    """A hand-given policy needs more memory than a tier has (the CLI exits 2)."""

    def __init__(self, *, where: str, needed: int, available: int, nearest: Policy | None):
        self.where, self.needed, self.available, self.nearest = where, needed, available, nearest
        fix = (f"the nearest policy that fits: {policy_flags(nearest)}" if nearest is not None else
               "no policy fits even with everything on disk and one sequence per block; give this rank more memory")
        super().__init__(f"the policy needs {format_size(needed)} on the {where} but {format_size(available)} "
                         f"are available; {fix}")


def check_policy(placement: Placement, hardware: Hardware, *, link_bw: float = DEFAULT_LINK_BW) -> None:
    """Refuse a placement that does not fit the hardware's capacities, before anything is
    allocated: raises PolicyDoesNotFit (one line: where, bytes needed and available, and the
    nearest policy that fits, in CLI flags)."""
    short = shortfalls(placement.bytes_per_tier(), hardware)
    if not short:
        return
    idx, limit, need = short[0]
    problem = RankProblem(FoldedRank.of(placement.spec, placement.units), hardware, dtypes=placement.dtypes,
                          workload=placement.workload, buffers=placement.buffers, link_bw=link_bw)
    raise PolicyDoesNotFit(where=limit_label(idx, limit), needed=need, available=limit.capacity,
                           nearest=nearest_fit(problem, placement.policy))


def nearest_fit(problem: RankProblem, policy: Policy) -> Policy | None:
    """The same block with tensors moved down until it fits; else smaller blocks (fewer GPU
    batches first, then smaller ones), each stepped down the same way."""
    fitted = fit_down(problem, policy)
    num_batches, batch = policy.num_gpu_batches, policy.gpu_batch_size
    while fitted is None and (num_batches > 1 or batch > 1):
        if num_batches > 1:
            num_batches //= 2
        else:
            batch //= 2
        fitted = fit_down(problem, policy.replace(num_gpu_batches=num_batches, gpu_batch_size=batch))
    return fitted


def policy_flags(policy: Policy) -> str:
    """The policy as command-line flags."""
    percents = [value for kind in KINDS for value in policy.percents(kind)[:2]]
    flags = [f"--gpu-batch-size {policy.gpu_batch_size}", f"--num-gpu-batches {policy.num_gpu_batches}",
             "--percent " + " ".join(f"{value:g}" for value in percents)]
    if policy.cpu_cache_compute:
        flags.append("--cpu-cache-compute")
    if policy.compress_weight:
        flags.append("--compress-weight")
    if policy.compress_cache:
        flags.append("--compress-cache")
        if policy.compression.cache_method != "kivi":
            flags.append(f"--compress-cache-method {policy.compression.cache_method}")
    if policy.cache_dtype is not None:
        flags.append(f"--cache-dtype {policy.cache_dtype}")
    if policy.attn_sparsity < 1:
        flags.append(f"--attn-sparsity {policy.attn_sparsity:g}")
    if not policy.overlap:
        flags.append("--no-overlap")
    if not policy.experts_on_demand:
        flags.append("--experts-ahead")
    return " ".join(flags)
