"""The linear program of one rank for one block shape and switch set (FlexGen section 4.3).

FlexGen's LP has the fractions wg wc wd, cg cc cd, hg hc hd as variables. Here tensors move
whole, so the fractions are what they really are, whole tensors on each tier (planning/fit.py's
lattice), and the program is a small mixed-integer one, solved by HiGHS (`scipy.optimize.milp`):

- weights: one-hot 0/1 variables u_j, v_j choosing how many tensors (in the order of their
  midpoints) sit on gpu, and on gpu or cpu. Every weight term (bytes per tier, load time, the
  staging slot's size) is a sum over tensors, so it is linear in u and v through prefix sums;
- KV cache and activations: integer counts of the 2K cache tensors (keys and values of K GPU
  batches) and K activation tensors of a layer on each tier;
- a time per (group of identical layers, phase) with T >= compute path and T >= load path (the
  per-layer max(); their sum without overlap); the decode phase is priced at its mean step;
- max() working buffers: the weight slot >= each layer's staged bytes; 0/1 variables for the KV
  scratch pair (some cache not read in place) and the disk read buffers (anything on disk).

No coefficient is written out a second time: the cost terms (cost_terms.py) and the byte counts
(placement.py) are evaluated on three "pure" placements (everything on gpu, on cpu, on disk) and
combined per tensor. What remains approximate: the mean decode step, and a KV pair split across
tiers, priced as the average of its two tiers. The search checks and polishes on the exact
placement afterwards (planning/fit.py).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .cost_terms import Work, act_work, cache_work, matmul_work, send_seconds, weight_place_work
from .fit import Lattice, Point, lattices, weight_mids
from .place import FoldedRank
from ..machine.hardware import Hardware
from ..spec.layout import Unit, UnitKind
from .placement import Buffers, Dtypes, Placement, Tier, Workload
from .tiers import piece_bytes
from .policy import Policy

TIERS = (Tier.GPU, Tier.CPU, Tier.DISK)
PURE = {Tier.GPU: (100.0, 0.0), Tier.CPU: (0.0, 100.0), Tier.DISK: (0.0, 0.0)}
MIP_TIME_LIMIT_S = 5.0  # per program; HiGHS returns its best point so far when it runs out


def pure_policy(policy: Policy, tier: Tier) -> Policy:
    gpu, cpu = PURE[tier]
    return policy.replace(w_gpu_percent=gpu, w_cpu_percent=cpu, cache_gpu_percent=gpu, cache_cpu_percent=cpu,
                          act_gpu_percent=gpu, act_cpu_percent=cpu)


@dataclass(frozen=True)
class LPResult:
    policy: Policy  # the block shape and switches it was solved for (percents not set)
    point: Point  # tensors per tier of each kind (planning/fit.py)
    block_s: float  # this rank's predicted seconds for one block's tasks (LP model)


class _Program:
    """Variables by name, and constraint rows A x <= b and A x == b."""

    def __init__(self):
        self.names: dict[str, int] = {}
        self.upper: list[float] = []
        self.integer: list[bool] = []
        self.rows: list[tuple[dict[int, float], float, float]] = []  # (coefs, lower, upper)

    def var(self, name: str, upper: float = np.inf, integer: bool = False) -> int:
        self.names[name] = len(self.upper)
        self.upper.append(upper)
        self.integer.append(integer)
        return self.names[name]

    def at_most(self, coefs: dict[int, float], bound: float) -> None:
        self.rows.append((coefs, -np.inf, bound))

    def equal(self, coefs: dict[int, float], value: float) -> None:
        self.rows.append((coefs, value, value))

    def solve(self, objective: dict[int, float], integral: bool):
        size = len(self.upper)
        a = np.zeros((len(self.rows), size))
        for row, (coefs, _, _) in enumerate(self.rows):
            for idx, value in coefs.items():
                a[row, idx] += value
        c = np.zeros(size)
        for idx, value in objective.items():
            c[idx] += value
        integrality = np.array(self.integer, dtype=float) if integral else np.zeros(size)
        with _quiet_stdout() if integral else nullcontext():
            return milp(c, integrality=integrality, bounds=Bounds(np.zeros(size), np.array(self.upper)),
                        constraints=[LinearConstraint(a, [r[1] for r in self.rows], [r[2] for r in self.rows])],
                        options={"time_limit": MIP_TIME_LIMIT_S})


@contextmanager
def _quiet_stdout():
    """HiGHS's MIP solver, as scipy builds it, printf()s a stray debug line
    ("HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();") that no option
    turns off; file descriptor 1 goes to /dev/null while it runs (planning runs before any
    other thread of ours writes)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class _Linear:
    """A constant plus coefficients of variables (a linear expression)."""

    def __init__(self, const: float = 0.0, coefs: dict[int, float] | None = None):
        self.const, self.coefs = const, dict(coefs or {})

    def add(self, other: "_Linear", factor: float = 1.0) -> "_Linear":
        self.const += factor * other.const
        for idx, value in other.coefs.items():
            self.coefs[idx] = self.coefs.get(idx, 0.0) + factor * value
        return self


def solve_rank(rank: FoldedRank, policy: Policy, hardware: Hardware, *, dtypes: Dtypes, workload: Workload,
               buffers: Buffers, link_bw: float, max_latency: float | None = None,
               integral: bool = False) -> LPResult | None:
    """The best tensors-per-tier for this rank and block shape, or None when nothing fits.

    integral=False solves the LP relaxation (fast: what the grid of block shapes needs), whose
    point is rounded down to whole tensors on the faster tiers; integral=True the exact program."""
    pure = {tier: rank.plan(pure_policy(policy, tier), dtypes=dtypes, workload=workload, buffers=buffers)
            for tier in TIERS}
    grids = lattices(rank, policy)
    prog = _Program()
    num = {"w": len(grids["w"].mids), "cache": 2 * policy.num_gpu_batches, "act": policy.num_gpu_batches}
    u = [prog.var(f"u{j}", 1, True) for j in range(num["w"] + 1)]  # j weight tensors on gpu
    v = [prog.var(f"v{j}", 1, True) for j in range(num["w"] + 1)]  # j on gpu or cpu
    prog.equal({idx: 1.0 for idx in u}, 1.0)
    prog.equal({idx: 1.0 for idx in v}, 1.0)
    prog.at_most({**{u[j]: float(j) for j in range(len(u))}, **{v[j]: -float(j) for j in range(len(v))}}, 0.0)
    counts = {}
    for kind in ("cache", "act"):
        counts[kind] = {tier: prog.var(f"{kind}_{tier}", num[kind], True) for tier in TIERS}
        prog.equal({idx: 1.0 for idx in counts[kind].values()}, num[kind])
    weights = _WeightTerms(rank, pure, grids["w"], hardware, u, v)
    objective, constant_s = _time_rows(prog, rank, pure, hardware, weights, counts, num, workload, link_bw)
    _memory_rows(prog, rank, pure, hardware, weights, counts, num)
    if max_latency is not None:  # the group of num_ranks blocks in flight, as if this rank were the slowest
        prog.at_most({idx: buffers.num_ranks * c for idx, c in objective.items()}, max_latency - buffers.num_ranks * constant_s)
    found = prog.solve(objective, integral)
    if found.x is None:  # infeasible (or no point found within the time limit)
        return None
    x = found.x
    # the fewest tensors any part of the solution puts on a faster tier (exact when integral)
    on_gpu = min(j for j, idx in enumerate(u) if x[idx] > 1e-6)
    on_fast = max(on_gpu, min(j for j, idx in enumerate(v) if x[idx] > 1e-6))
    point = [(on_gpu, on_fast)]
    for kind in ("cache", "act"):
        gpu = int(np.floor(x[counts[kind][Tier.GPU]] + 1e-6))
        fast = int(np.floor(x[counts[kind][Tier.GPU]] + x[counts[kind][Tier.CPU]] + 1e-6))
        point.append((gpu, max(gpu, fast)))
    return LPResult(policy, tuple(point), float(found.fun) + constant_s)


class _WeightTerms:
    """Per-tensor weight quantities as linear expressions of u (gpu boundary) and v (cpu one).

    Tensor i (lattice position pos_i) is on gpu if pos_i < j_gpu, on cpu if < j_fast, else on
    disk, so sum_i q_i(tier_i) = sum_i q_i(disk) + sum_j v_j sum_{pos_i < j} (q_i(cpu) - q_i(disk))
    + sum_j u_j sum_{pos_i < j} (q_i(gpu) - q_i(cpu))."""

    def __init__(self, rank: FoldedRank, pure: dict[Tier, Placement], grid: Lattice, hardware: Hardware,
                 u: list[int], v: list[int]):
        self.rank, self.pure, self.u, self.v = rank, pure, u, v
        self.speeds, self.sep = hardware.speeds, pure[Tier.GPU].buffers.separate_gpu
        self.positions = {layer_idx: grid.positions(mids) for layer_idx, mids in weight_mids(rank).items()}

    def expr(self, layer_idx: int, quantity) -> _Linear:
        """quantity(placement, weight place) summed over the layer's tensors, as a _Linear."""
        out = _Linear()
        places = {tier: self.pure[tier].weights[layer_idx] for tier in TIERS}
        for i, pos in enumerate(self.positions[layer_idx]):
            q = {tier: quantity(self.pure[tier], places[tier][i]) for tier in TIERS}
            out.const += q[Tier.DISK]
            for j in range(pos + 1, len(self.u)):
                out.coefs[self.v[j]] = out.coefs.get(self.v[j], 0.0) + q[Tier.CPU] - q[Tier.DISK]
                out.coefs[self.u[j]] = out.coefs.get(self.u[j], 0.0) + q[Tier.GPU] - q[Tier.CPU]
        return out

    def path(self, layer_idx: int, compute: bool, token_idx: float) -> _Linear:
        def seconds(p: Placement, w) -> float:
            work = weight_place_work(p, self.speeds, w, token_idx)
            return work.compute_path(self.sep) if compute else work.load_path(self.sep)
        return self.expr(layer_idx, seconds)

    def bytes_on(self, tier: Tier) -> _Linear:
        out = _Linear()
        for unit in self.rank.representatives:
            out.add(self.expr(unit.layer_idx, lambda p, w: p.weight_footprint(w) if w.tier is tier else 0),
                    self.rank.repeats[unit.layer_idx])
        return out

    def slot(self, layer_idx: int) -> _Linear:
        """Bytes of the layer's staging slot: every non-resident piece, each aligned."""
        def slot_share(p: Placement, w) -> float:
            total = 0
            for piece in p.slot_layouts[layer_idx]:
                if piece.name == w.name:
                    total += piece_bytes(piece.shape, piece.dtype)
            return total
        return self.expr(layer_idx, slot_share)


def _groups(rank: FoldedRank) -> list[tuple[Unit, bool, int]]:
    """Identical layers of a task: (representative, hands its hidden state on?, how many)."""
    last = rank.representatives[-1].layer_idx
    groups = []
    for unit in rank.representatives:
        count = rank.repeats[unit.layer_idx]
        stores = count - (1 if unit.layer_idx == last else 0)
        if stores:
            groups.append((unit, True, stores))
        if count - stores:
            groups.append((unit, False, count - stores))
    return groups


def _time_rows(prog: _Program, rank: FoldedRank, pure: dict[Tier, Placement], hardware: Hardware,
               weights: _WeightTerms, counts: dict, num: dict, workload: Workload,
               link_bw: float) -> tuple[dict[int, float], float]:
    """T >= compute path and T >= load path per group of layers and phase; returns the
    objective (seconds of one block on this rank) and its constant part (sends)."""
    speeds, sep = hardware.speeds, weights.sep
    overlap = pure[Tier.GPU].policy.overlap
    n = workload.gen_len
    phases = [(0, 1.0)] + ([(n / 2, float(n - 1))] if n > 1 else [])  # (token_idx, tasks per block)
    last_stage = rank.units[-1].kind is UnitKind.HEAD
    weight_paths = {(unit.layer_idx, compute, token_idx): weights.path(unit.layer_idx, compute, token_idx)
                    for unit in rank.representatives for compute in (True, False) for token_idx, _ in phases}
    objective, constant_s = {}, 0.0
    for phase_idx, (token_idx, tasks) in enumerate(phases):
        constant_s += tasks * send_seconds(pure[Tier.GPU], token_idx, link_bw, last_stage=last_stage)
        acts = {tier: act_work(pure[tier], speeds, token_idx) for tier in TIERS}
        for group_idx, (unit, stores, count) in enumerate(_groups(rank)):
            t_var = prog.var(f"T{phase_idx}_{group_idx}")
            objective[t_var] = tasks * count
            fixed = matmul_work(pure[Tier.GPU], speeds, unit, token_idx)
            paths = []
            for compute in (True, False):
                expr = _Linear(fixed.compute_path(sep) if compute else fixed.load_path(sep))
                expr.add(weight_paths[(unit.layer_idx, compute, token_idx)])
                per_tensor: list[tuple[str, Tier, Work]] = []
                for tier in TIERS:
                    if unit.has_cache:
                        per_tensor.append(("cache", tier, cache_work(pure[tier], speeds, unit.layer_idx, token_idx)))
                    if stores:
                        per_tensor.append(("act", tier, acts[tier]))
                for kind, tier, work in per_tensor:
                    seconds = work.compute_path(sep) if compute else work.load_path(sep)
                    expr.add(_Linear(0.0, {counts[kind][tier]: seconds / num[kind]}))
                paths.append(expr)
            rows = paths if overlap else [paths[0].add(paths[1])]
            for expr in rows:
                prog.at_most({**expr.coefs, t_var: -1.0}, -expr.const)
    return objective, constant_s


# Estimates of bounded temporaries (planning/working.py) that exist whatever the tiers.
FIXED_ESTIMATES = ("dequantize scratch", "attention chunk", "attention chunk on host")


def _memory_rows(prog: _Program, rank: FoldedRank, pure: dict[Tier, Placement], hardware: Hardware,
                 weights: _WeightTerms, counts: dict, num: dict) -> None:
    """Bytes per tier, linear in the variables, under every memory limit of the hardware."""
    used = {tier: weights.bytes_on(tier) for tier in TIERS}
    for kind, part in (("cache", lambda p: _cache_bytes(rank, p)), ("act", lambda p: p.act_bytes())):
        for x in TIERS:
            for tier, nbytes in part(pure[x]).items():
                used[tier].add(_Linear(0.0, {counts[kind][x]: nbytes / num[kind]}))
    # the weight slots: (prefetch depth + 1) of them, each as large as the largest layer's staging
    slot = prog.var("slot")
    for unit in rank.representatives:
        expr = weights.slot(unit.layer_idx)
        prog.at_most({**expr.coefs, slot: -1.0}, -expr.const)
    num_slots = pure[Tier.GPU].buffers.prefetch_depth + 1
    used[Tier.GPU].add(_Linear(0.0, {slot: num_slots}))
    # buffers that exist as soon as one tensor needs them: the KV scratch pair, the read buffers
    biggest: dict[str, tuple[Tier, int]] = {}
    fixed: dict[str, tuple[Tier, int]] = {}
    for p in pure.values():
        for buf in p.working:
            if buf.name in ("send/recv", "compute workspace") and p is pure[Tier.GPU]:
                used[buf.tier].add(_Linear(buf.nbytes))
            elif buf.name in ("kv scratch", "read buffers") and buf.nbytes > biggest.get(buf.name, (None, -1))[1]:
                biggest[buf.name] = (buf.tier, buf.nbytes)
            elif buf.name in FIXED_ESTIMATES and buf.nbytes > fixed.get(buf.name, (None, -1))[1]:
                fixed[buf.name] = (buf.tier, buf.nbytes)
    for tier, nbytes in fixed.values():  # small and all but constant across tiers: their largest
        used[tier].add(_Linear(nbytes))
    if "kv scratch" in biggest:
        scratch = prog.var("scratch", 1, True)
        used[biggest["kv scratch"][0]].add(_Linear(0.0, {scratch: biggest["kv scratch"][1]}))
        for x, p in pure.items():
            if any(not c.in_place for c in p.caches.values()):
                prog.at_most({counts["cache"][x]: 1.0 / num["cache"], scratch: -1.0}, 0.0)
    if "read buffers" in biggest:
        read = prog.var("read", 1, True)
        used[biggest["read buffers"][0]].add(_Linear(0.0, {read: biggest["read buffers"][1]}))
        prog.at_most({weights.v[-1]: -1.0, read: -1.0}, -1.0)  # some weight on disk: v_N = 0
        for kind in ("cache", "act"):
            prog.at_most({counts[kind][Tier.DISK]: 1.0 / num[kind], read: -1.0}, 0.0)
    for limit in hardware.memory_limits():
        total = _Linear()
        for name in limit.tiers:
            total.add(used[Tier(name)])
        prog.at_most(total.coefs, limit.capacity - total.const)


def _cache_bytes(rank: FoldedRank, p: Placement) -> dict[Tier, int]:
    out = dict.fromkeys(TIERS, 0)
    for (layer_idx, _), c in p.caches.items():
        for which in ("k", "v"):
            out[c.tier(which)] += rank.repeats[layer_idx] * p.cache_footprint(c, which) * p.blocks_in_flight
    return out
