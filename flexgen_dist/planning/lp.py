"""The linear program of one rank for one block shape and switch set (FlexGen section 4.3).

Variables: the fractions of weights, KV cache and activations on each tier (wg wc wd, cg cc cd,
hg hc hd, each triple summing to 1), a time per (unit, phase) with T >= compute path and
T >= load path (the max() of the per-layer model; their sum without overlap), and a 0/1
variable for the KV scratch pair, a working buffer that exists as soon as one cache is not read
in place (>= that cache's fraction). With it fixed the problem is a linear program, solved by
HiGHS (`scipy.optimize.linprog`) once with the pair and once without (scipy's MILP would do the
same, but its HiGHS build prints to stdout).

The coefficients are not written out a second time: every term of the cost model is linear in
where a kind of tensor lives, so the cost terms and the exact byte counts are evaluated on
three "pure" placements (everything on gpu, on cpu, on disk) and interpolated. What the LP
cannot see, because tensors move whole and the decode steps are priced at their mean, the
search settles on the exact placement afterwards (planning/fit.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from .cost_terms import Work, act_work, cache_work, matmul_work, send_seconds, weight_work
from .folding import FoldedRank
from .hardware import Hardware
from .layout import Unit, UnitKind
from .placement import Buffers, Dtypes, Placement, Tier, Workload
from .policy import Policy

KINDS = ("w", "cache", "act")
TIERS = (Tier.GPU, Tier.CPU, Tier.DISK)
PURE = {Tier.GPU: (100.0, 0.0), Tier.CPU: (0.0, 100.0), Tier.DISK: (0.0, 0.0)}
NUM_FRACTIONS = 9  # (w, cache, act) x (gpu, cpu, disk)


def frac_index(kind: str, tier: Tier) -> int:
    return 3 * KINDS.index(kind) + TIERS.index(tier)


def pure_policy(policy: Policy, tier: Tier) -> Policy:
    gpu, cpu = PURE[tier]
    return policy.replace(w_gpu_percent=gpu, w_cpu_percent=cpu, cache_gpu_percent=gpu, cache_cpu_percent=cpu,
                          act_gpu_percent=gpu, act_cpu_percent=cpu)


@dataclass(frozen=True)
class LPResult:
    policy: Policy  # the block shape and switches it was solved for (percents not set)
    fractions: dict[str, tuple[float, float, float]]  # kind -> (gpu, cpu, disk)
    block_s: float  # this rank's predicted seconds for one block's tasks (LP model)


class _Rows:
    """Linear constraints A x <= b, collected row by row."""

    def __init__(self, size: int):
        self.size = size
        self.a: list[np.ndarray] = []
        self.b: list[float] = []

    def add(self, coefs: dict[int, float], upper: float) -> None:
        row = np.zeros(self.size)
        for idx, value in coefs.items():
            row[idx] += value
        self.a.append(row)
        self.b.append(upper)


def solve_rank(rank: FoldedRank, policy: Policy, hardware: Hardware, *, dtypes: Dtypes, workload: Workload,
               buffers: Buffers, link_bw: float, max_latency: float | None = None) -> LPResult | None:
    """The best fractions for this rank and block shape, or None when nothing fits (LP model)."""
    pure = {tier: rank.plan(pure_policy(policy, tier), dtypes=dtypes, workload=workload, buffers=buffers)
            for tier in TIERS}
    n = workload.gen_len
    phases = [(0, 1.0)] + ([(n / 2, float(n - 1))] if n > 1 else [])  # (token_idx, tasks per block)
    groups = _layer_groups(rank)
    size = NUM_FRACTIONS + len(groups) * len(phases) + 1
    z_scratch = size - 1
    rows = _Rows(size)
    objective, constant_s = _time_rows(rows, rank, pure, hardware, phases, groups, link_bw)
    scratch_possible = _memory_rows(rows, rank, pure, hardware, z_scratch)
    if max_latency is not None:
        # the whole group of num_ranks blocks in flight, as if this rank were the slowest
        rows.add({i: buffers.num_ranks * objective[i] for i in range(size) if objective[i]},
                 max_latency - buffers.num_ranks * constant_s)
    equal = np.zeros((3, size))
    for k, kind in enumerate(KINDS):
        for tier in TIERS:
            equal[k, frac_index(kind, tier)] = 1.0
    a_ub, b_ub = np.array(rows.a), np.array(rows.b)
    best = None
    for scratch in ((0.0, 1.0) if scratch_possible else (0.0,)):  # the KV scratch pair is there or not
        bounds = [(0.0, 1.0)] * NUM_FRACTIONS + [(0.0, None)] * (size - 1 - NUM_FRACTIONS) + [(scratch, scratch)]
        found = linprog(objective, A_ub=a_ub, b_ub=b_ub, A_eq=equal, b_eq=np.ones(3), bounds=bounds, method="highs")
        if found.status == 0 and (best is None or found.fun < best.fun):
            best = found
    if best is None:
        return None
    fractions = {kind: tuple(float(min(1.0, max(0.0, best.x[frac_index(kind, tier)]))) for tier in TIERS)
                 for kind in KINDS}
    return LPResult(policy, fractions, float(best.fun) + constant_s)


def _layer_groups(rank: FoldedRank) -> list[tuple[Unit, bool, int]]:
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


def _time_rows(rows: _Rows, rank: FoldedRank, pure: dict[Tier, Placement], hardware: Hardware,
               phases: list[tuple[float, float]], groups: list[tuple[Unit, bool, int]],
               link_bw: float) -> tuple[np.ndarray, float]:
    """T >= compute path and T >= load path (their sum without overlap) for every group of
    layers and phase; returns the objective (seconds of one block) and its constant part."""
    speeds, sep, overlap = hardware.speeds, pure[Tier.GPU].buffers.separate_gpu, pure[Tier.GPU].policy.overlap
    objective = np.zeros(rows.size)
    constant_s = 0.0
    last_stage = rank.units[-1].kind is UnitKind.HEAD
    weights = {(unit.layer_idx, tier): weight_work(pure[tier], speeds, unit.layer_idx)
               for unit in rank.representatives for tier in TIERS}
    for phase_idx, (token_idx, tasks) in enumerate(phases):
        acts = {tier: act_work(pure[tier], speeds, token_idx) for tier in TIERS}
        constant_s += tasks * send_seconds(pure[Tier.GPU], token_idx, link_bw, last_stage=last_stage)
        for group_idx, (unit, stores, count) in enumerate(groups):
            t_var = NUM_FRACTIONS + phase_idx * len(groups) + group_idx
            objective[t_var] = tasks * count
            fixed = matmul_work(pure[Tier.GPU], speeds, unit, token_idx)
            terms: list[tuple[int, Work]] = []
            for tier in TIERS:
                terms.append((frac_index("w", tier), weights[(unit.layer_idx, tier)]))
                if unit.has_cache:
                    terms.append((frac_index("cache", tier), cache_work(pure[tier], speeds, unit.layer_idx, token_idx)))
                if stores:
                    terms.append((frac_index("act", tier), acts[tier]))
            coef_c: dict[int, float] = {}
            coef_l: dict[int, float] = {}
            for idx, work in terms:
                coef_c[idx] = coef_c.get(idx, 0.0) + work.compute_path(sep)
                coef_l[idx] = coef_l.get(idx, 0.0) + work.load_path(sep)
            const_c, const_l = fixed.compute_path(sep), fixed.load_path(sep)
            if overlap:
                rows.add({**coef_c, t_var: -1.0}, -const_c)
                rows.add({**coef_l, t_var: -1.0}, -const_l)
            else:
                both = {idx: coef_c[idx] + coef_l[idx] for idx in coef_c}
                rows.add({**both, t_var: -1.0}, -(const_c + const_l))
    return objective, constant_s


def _memory_rows(rows: _Rows, rank: FoldedRank, pure: dict[Tier, Placement], hardware: Hardware,
                 z_scratch: int) -> bool:
    """Bytes per tier, linear in the fractions, under every memory limit of the hardware.
    Returns whether any tier's cache needs the KV scratch pair (z_scratch >= its fraction).
    The disk read buffers (a few chunks) are counted whether or not anything is on disk."""
    coefs: dict[Tier, dict[int, float]] = {tier: {} for tier in TIERS}  # per tier: {variable: bytes}
    const: dict[Tier, float] = dict.fromkeys(TIERS, 0.0)

    def add(tier: Tier, idx: int | None, nbytes: float) -> None:
        if idx is None:
            const[tier] += nbytes
        else:
            coefs[tier][idx] = coefs[tier].get(idx, 0.0) + nbytes

    for x, p in pure.items():
        for kind, part in (("w", _weights(rank, p)), ("cache", _caches(rank, p)), ("act", p.act_bytes())):
            for tier, nbytes in part.items():
                add(tier, frac_index(kind, x), nbytes)
        for buf in p.working:
            if buf.name == "weight slots":
                add(buf.tier, frac_index("w", x), buf.nbytes)
    biggest: dict[str, tuple[Tier, int]] = {}
    for p in pure.values():
        for buf in p.working:
            if buf.name in ("kv scratch", "read buffers") and buf.nbytes > biggest.get(buf.name, (None, -1))[1]:
                biggest[buf.name] = (buf.tier, buf.nbytes)
    for buf in pure[Tier.GPU].working:
        if buf.name in ("send/recv", "compute workspace"):
            add(buf.tier, None, buf.nbytes)
    if "read buffers" in biggest:
        add(biggest["read buffers"][0], None, biggest["read buffers"][1])
    scratch_possible = False
    for x, p in pure.items():
        if any(not c.in_place for c in p.caches.values()):
            rows.add({frac_index("cache", x): 1.0, z_scratch: -1.0}, 0.0)
            scratch_possible = True
    if scratch_possible:
        add(biggest["kv scratch"][0], z_scratch, biggest["kv scratch"][1])
    for limit in hardware.memory_limits():
        tiers = [Tier(name) for name in limit.tiers]
        row: dict[int, float] = {}
        for tier in tiers:
            for idx, nbytes in coefs[tier].items():
                row[idx] = row.get(idx, 0.0) + nbytes
        rows.add(row, limit.capacity - sum(const[tier] for tier in tiers))
    return scratch_possible


def _weights(rank: FoldedRank, p: Placement) -> dict[Tier, int]:
    out = dict.fromkeys(TIERS, 0)
    for unit in rank.representatives:
        for w in p.weights[unit.layer_idx]:
            out[w.tier] += rank.repeats[unit.layer_idx] * w.nbytes
    return out


def _caches(rank: FoldedRank, p: Placement) -> dict[Tier, int]:
    out = dict.fromkeys(TIERS, 0)
    for (layer_idx, _), c in p.caches.items():
        for tier in (c.k_tier, c.v_tier):
            out[tier] += rank.repeats[layer_idx] * c.nbytes * p.blocks_in_flight
    return out
