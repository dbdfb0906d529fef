"""The policy search: the block shape, the placement fractions and the switches that maximise
predicted throughput within the memory limits (FlexGen section 4.3; no torch).

For every allowed switch set (compression, CPU attention, 16-bit cache) and block shape
(gpu_batch_size x num_gpu_batches from a grid), each rank's LP relaxation (planning/lp.py)
predicts the best throughput. More GPU batches only need more memory, so a row of the grid stops
at the first shape that does not fit, and so do larger GPU batches. The best shapes by that
prediction are then settled: each rank's exact program (whole tensors) gives the tensors per
tier, checked on the exact placement and polished by single-tensor moves (planning/fit.py), and
the cost model scores the result over every decode step. Every rank shares the block shape and
switches (blocks flow through all of them); each has its own fractions (its layers, its memory).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import UserError
from .cost_model import DEFAULT_LINK_BW, Estimate, combine, estimate_pipeline
from .fit import RankProblem, fit_down, lattices, limit_label, policy_flags, polish, shortfalls, to_policy
from .place import FoldedRank
from ..machine.hardware import Hardware
from ..spec.layout import Unit
from .lp import LPResult, solve_rank
from .placement import Buffers, Dtypes, Placement, Workload
from .policy import Policy
from ..sizes import format_size
from ..spec.model import ModelSpec

logger = logging.getLogger(__name__)

GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NUM_GPU_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
TIE_TOLERANCE = 0.005  # predicted throughputs this close count as equal


@dataclass(frozen=True)
class SearchOptions:
    allow_compression: bool = False
    """Also try 4-bit weights and/or KV cache (--allow-compression)."""
    allow_cpu_attention: bool = True
    """Also try decode attention on the CPU over a host-memory cache (only with a GPU)."""
    allow_cache_16bit: bool = False
    """Also try a float16 KV cache when the compute dtype is float32."""
    max_latency: float | None = None
    """Seconds one block may take from its prefill to its last token (--max-latency)."""
    gpu_batch_sizes: tuple[int, ...] = GPU_BATCH_SIZES
    num_gpu_batches: tuple[int, ...] = NUM_GPU_BATCHES
    finalists: int = 6
    """Best LP candidates settled on the exact placement."""
    link_bw: float = DEFAULT_LINK_BW
    """Bytes/s between pipeline ranks (the hardware description has no such field)."""

    def __post_init__(self) -> None:
        if self.max_latency is not None and not self.max_latency > 0:
            raise UserError(f"--max-latency {self.max_latency!r} must be a positive number of seconds")
        for name in ("gpu_batch_sizes", "num_gpu_batches"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise UserError(f"search option {name} must list whole numbers >= 1, got {values!r}")


@dataclass(frozen=True)
class Plan:
    policies: tuple[Policy, ...]  # per rank (same block shape and switches, own fractions)
    placements: tuple[Placement, ...]  # per rank, every unit: what the engine allocates
    estimate: Estimate
    candidates_tried: int  # linear programs solved
    lp_throughput: float = field(default=0.0)  # what the LP predicted for the chosen shape

    @property
    def policy(self) -> Policy:
        if len(self.policies) != 1:
            raise ValueError("a pipeline plan has one policy per rank: use plan.policies[rank]")
        return self.policies[0]

    @property
    def placement(self) -> Placement:
        if len(self.placements) != 1:
            raise ValueError("a pipeline plan has one placement per rank: use plan.placements[rank]")
        return self.placements[0]

    def summary(self) -> str:
        """What --print-policy shows: each rank's policy as flags, its bytes per tier, and the
        prediction (throughput, prefill and decode time, what bounds a decode step)."""
        est = self.estimate
        lines = []
        for rank, (policy, used) in enumerate(zip(self.policies, est.peak_bytes)):
            where = f"rank {rank}: " if len(self.policies) > 1 else ""
            tiers = ", ".join(f"{tier} {format_size(nbytes)}" for tier, nbytes in used.items())
            lines.append(f"{where}{policy_flags(policy)}  ({tiers})")
        step = est.decode
        bound = (f"; a decode step {step.seconds:.3g} s, {step.bound}-bound (compute {step.compute_s:.3g} s, "
                 f"loads {step.load_s:.3g} s)") if step is not None else ""
        lines.append(f"predicted {est.throughput:.4g} tokens/s: {est.num_blocks} block(s), prefill {est.prefill_s:.3g} s, "
                     f"decode {est.decode_s:.3g} s{bound}")
        return "\n".join(lines)


def search(spec: ModelSpec, stages: Sequence[Sequence[Unit]], hardware: Hardware, *, dtypes: Dtypes,
           workload: Workload, buffers: Buffers, num_prompts: int | None = None, base: Policy = Policy(),
           options: SearchOptions = SearchOptions()) -> Plan:
    """The best plan for every rank; stages[r] are rank r's units. `base` gives what is not
    searched (overlap, attn_sparsity, compression bits and group size, and the switches that
    are not allowed to change). Raises UserError when nothing fits or meets max_latency."""
    if len(stages) != buffers.num_ranks:
        raise ValueError(f"{len(stages)} stages but buffers.num_ranks = {buffers.num_ranks}")
    problems = [RankProblem(FoldedRank.of(spec, units), hardware, dtypes=dtypes, workload=workload, buffers=buffers,
                            link_bw=options.link_bw) for units in stages]
    results, tried = _solve_grid(problems, hardware, options, base, num_prompts)
    results.sort(key=_lp_order)
    settled: list[tuple[Estimate, list[Policy], float]] = []
    for lp_throughput, per_rank in results:
        policies = _settle(problems, per_rank, options)
        if policies is not None:
            settled.append((_exact_estimate(problems, policies, num_prompts), policies, lp_throughput))
        if len(settled) >= options.finalists and any(_within_latency(e, options) for e, _, _ in settled):
            break
    if not settled:  # the LP's buffers are maxima over tiers: try the smallest plan on the exact placement
        fitted = [fit_down(problem, _smallest(base, options)) for problem in problems]
        if all(policy is not None for policy in fitted):
            policies = [polish(problem, policy) for problem, policy in zip(problems, fitted)]
            settled.append((_exact_estimate(problems, policies, num_prompts), policies, 0.0))
    chosen = _choose(settled, options)
    if chosen is None:
        fastest = min((e.block_s for e, _, _ in settled), default=None)
        if fastest is None and options.max_latency is not None:
            unbounded, _ = _solve_grid(problems, hardware, dataclasses.replace(options, max_latency=None), base, num_prompts)
            fastest = min((len(problems) * max(lp.block_s for lp in per_rank) for _, per_rank in unbounded), default=None)
        if fastest is not None:
            raise UserError(f"no plan generates a block within --max-latency {options.max_latency:g} s; the fastest "
                            f"takes about {fastest:.3g} s: raise --max-latency")
        raise _nothing_fits(problems, base, options)
    _, policies, lp_throughput = chosen
    placements = tuple(problem.rank.plan_all(policy, dtypes=dtypes, workload=workload, buffers=buffers)
                       for problem, policy in zip(problems, policies))
    for placement in placements:  # the folded bytes are exact; this guards that promise
        if shortfalls(placement.bytes_per_tier(), hardware):
            raise AssertionError(f"planned policy does not fit after all: {placement.policy}")
    final = estimate_pipeline(placements, hardware, num_prompts, link_bw=options.link_bw)
    logger.info("policy search: %d linear programs, chose %s (predicted %.3g tokens/s)", tried,
                policy_flags(policies[0]), final.throughput)
    return Plan(tuple(policies), placements, final, tried, lp_throughput)


def _lp_order(item: tuple[float, list[LPResult]]) -> tuple:
    """Best LP throughput first; near ties (TIE_TOLERANCE buckets) larger GPU batches first."""
    throughput, per_rank = item
    shape = per_rank[0].policy
    bucket = math.floor(math.log(throughput) / math.log1p(TIE_TOLERANCE)) if throughput > 0 else -math.inf
    return -bucket, -shape.gpu_batch_size, -shape.block_size


def _within_latency(est: Estimate, options: SearchOptions) -> bool:
    return options.max_latency is None or est.block_s <= options.max_latency


def _choose(settled: list[tuple[Estimate, list[Policy], float]], options: SearchOptions):
    """The highest predicted throughput within the latency bound; among plans within
    TIE_TOLERANCE of it, the largest GPU batch (bigger batches amortise per-kernel and Python
    overheads the cost model does not count)."""
    allowed = [item for item in settled if _within_latency(item[0], options)]
    if not allowed:
        return None
    top = max(item[0].throughput for item in allowed)
    near = [item for item in allowed if item[0].throughput >= top * (1 - TIE_TOLERANCE)]
    return max(near, key=lambda item: (item[1][0].gpu_batch_size, item[1][0].block_size, item[0].throughput))


def switch_sets(base: Policy, options: SearchOptions, hardware: Hardware, dtypes: Dtypes,
                experts: bool = False) -> list[Policy]:
    """The base policy with every allowed combination of switches (and, for a mixture of
    `experts`, its decode steps' experts loaded on demand or ahead)."""
    cpu_attention = [base.cpu_cache_compute]
    if options.allow_cpu_attention and hardware.capacities.has_gpu:
        cpu_attention = [False, True]
    compress = [(base.compress_weight, base.compress_cache)]
    if options.allow_compression:
        compress = [(False, False), (False, True), (True, False), (True, True)]
    cache_dtypes = [base.cache_dtype]
    if options.allow_cache_16bit and dtypes.compute == "float32" and base.cache_dtype is None:
        cache_dtypes.append("float16")
    out = []
    for ccc in cpu_attention:
        for weight, cache in compress:
            if ccc and cache:
                continue  # CPU attention reads an uncompressed host cache (as in FlexGen)
            for cache_dtype in (cache_dtypes if not cache else [None]):
                for on_demand in ([True, False] if experts and base.experts_on_demand else [base.experts_on_demand]):
                    out.append(base.replace(cpu_cache_compute=ccc, compress_weight=weight, compress_cache=cache,
                                            cache_dtype=cache_dtype, experts_on_demand=on_demand))
    return list(dict.fromkeys(out))


def _solve_grid(problems: list[RankProblem], hardware: Hardware, options: SearchOptions, base: Policy,
                num_prompts: int | None) -> tuple[list[tuple[float, list[LPResult]]], int]:
    first = problems[0]
    results, tried = [], 0
    for switches in switch_sets(base, options, hardware, first.dtypes, experts=first.rank.spec.num_experts > 0):
        for batch in options.gpu_batch_sizes:
            fitted_any = False
            for num_batches in options.num_gpu_batches:
                policy = switches.replace(gpu_batch_size=batch, num_gpu_batches=num_batches)
                per_rank = []
                for problem in problems:
                    tried += 1
                    lp = solve_rank(problem.rank, policy, hardware, dtypes=problem.dtypes, workload=problem.workload,
                                    buffers=problem.buffers, link_bw=problem.link_bw, max_latency=options.max_latency)
                    if lp is None:
                        break
                    per_rank.append(lp)
                if len(per_rank) < len(problems):
                    break  # more GPU batches only need more memory
                fitted_any = True
                results.append((_lp_throughput(per_rank, policy, first.workload, num_prompts), per_rank))
                if num_prompts and policy.block_size >= num_prompts:
                    break
            if not fitted_any or (num_prompts and batch >= num_prompts):
                break  # larger GPU batches only need more memory
    return results, tried


def _lp_throughput(per_rank: list[LPResult], policy: Policy, workload: Workload, num_prompts: int | None) -> float:
    """Tokens/s by the LP's times: a group of P blocks takes P times the slowest rank's block."""
    num_ranks = len(per_rank)
    blocks = -(-num_prompts // policy.block_size) if num_prompts else num_ranks
    groups = -(-blocks // num_ranks)
    seconds = groups * num_ranks * max(lp.block_s for lp in per_rank)
    tokens = (num_prompts or blocks * policy.block_size) * workload.gen_len
    return tokens / seconds if seconds > 0 else float("inf")


def _settle(problems: list[RankProblem], per_rank: list[LPResult], options: SearchOptions) -> list[Policy] | None:
    """Each rank's exact program (whole tensors) for this shape, its point checked on the exact
    placement (stepped down if short, which its exact bytes should never be) and polished."""
    policies = []
    for problem, relaxed in zip(problems, per_rank):
        lp = solve_rank(problem.rank, relaxed.policy, problem.hardware, dtypes=problem.dtypes,
                        workload=problem.workload, buffers=problem.buffers, link_bw=problem.link_bw,
                        max_latency=options.max_latency, integral=True) or relaxed
        grids = lattices(problem.rank, lp.policy)
        fitted = fit_down(problem, to_policy(lp.point, lp.policy, grids))
        if fitted is None:
            return None
        policies.append(polish(problem, fitted))
    return policies


def _exact_estimate(problems: list[RankProblem], policies: list[Policy], num_prompts: int | None) -> Estimate:
    stages = [problem.stage(policy) for problem, policy in zip(problems, policies)]
    return combine(stages, block_size=policies[0].block_size, gen_len=problems[0].workload.gen_len,
                   num_prompts=num_prompts)


def _smallest(base: Policy, options: SearchOptions) -> Policy:
    """The smallest block of the grid (the block itself when one is given), everything on disk,
    compressed if allowed."""
    smallest = base.replace(gpu_batch_size=min(options.gpu_batch_sizes), num_gpu_batches=min(options.num_gpu_batches),
                            w_gpu_percent=0, w_cpu_percent=0,
                            cache_gpu_percent=0, cache_cpu_percent=0, act_gpu_percent=0, act_cpu_percent=0)
    if options.allow_compression:
        smallest = smallest.replace(compress_weight=True, compress_cache=True)
    return smallest


def _nothing_fits(problems: list[RankProblem], base: Policy, options: SearchOptions) -> UserError:
    """What the smallest plan needs where it is short (on the first rank that is short)."""
    smallest = _smallest(base, options)
    for rank, problem in enumerate(problems):
        short = problem.shortfalls(smallest)
        if short:
            break
    else:  # every rank fits it, so fit_down found it: unreachable unless the planner is broken
        raise AssertionError("the smallest plan fits but the search kept no plan")
    idx, limit, need = short[0]
    what = "all weights, KV cache and activations" if limit.tiers == ("disk",) else \
        "the working set: weight slots, KV scratch, compute workspace"
    where = f"rank {rank}'s " if len(problems) > 1 else "the "
    if smallest.block_size == 1:
        plan, fix = "the smallest plan (1 sequence per block, everything on disk)", "give this rank more memory or use more ranks"
    else:  # the block was given
        plan = (f"the smallest plan with blocks of {smallest.gpu_batch_size} x {smallest.num_gpu_batches} "
                f"(everything on disk)")
        fix = "give a smaller --gpu-batch-size / --num-gpu-batches (or leave them to the planner), or more memory"
    return UserError(f"{plan} needs {format_size(need)} on {where}{limit_label(idx, limit)} ({what}) but "
                     f"{format_size(limit.capacity)} are available; {fix}")
