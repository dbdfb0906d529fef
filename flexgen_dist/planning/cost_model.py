"""The cost model: predicted time per layer, per task and per workload, and peak bytes per tier,
of a placement on a hardware description (pure Python, no torch).

Glossary: the paper's symbols (FlexGen, Sheng et al. 2023, section 4.3 and its cost_model.py)
and what they are called here.

    wg, wc, wn (wd)   Policy.w_gpu_percent, w_cpu_percent, the rest (disk), as fractions
    cg, cc, cn (cd)   Policy.cache_gpu_percent, cache_cpu_percent, the rest
    hg, hc, hn (hd)   Policy.act_gpu_percent, act_cpu_percent, the rest
    gbs               Policy.gpu_batch_size
    bls               Policy.block_size = gbs * num_gpu_batches
    s, n              Workload.prompt_len, Workload.gen_len
    l                 the layers (units) of this rank: Placement.units
    h1, h2, nh        ModelSpec.hidden_size, intermediate_size, num_heads
    T_pre, T_gen      StageTimes.prefill, StageTimes.decode_steps (one task: all layers of a rank)
    ctog, dtoc        Work.weight_link / cache_link, Work.weight_disk / cache_disk
    gtoc, ctod        Work.cache_store and Work.act_io (device -> host -> disk)
    comp              Work.matmul + attention + cpu_attention + codec
    ctog_bdw ...      Speeds.h2d_bw, d2h_bw (gtoc), disk_read_bw (dtoc), disk_write_bw (ctod)
    mm_flops_p/_g     Speeds.matmul_flops / decode_matmul_flops
    bmm_flops_p/_g    Speeds.attention_flops / decode_attention_flops
    cpu_flops         Speeds.cpu_attention_flops
    (not in the paper) a GEMM of r rows takes a fixed time (its weights streamed once per GPU
                      batch) plus r rows at mm_flops_p, fitted to mm_flops_g at 32 rows
                      (cost_terms.matmul_seconds)

The model (terms in cost_terms.py): a layer's time in a task is max(compute path, load path)
with overlap, their sum without (FlexGen's per-layer max). A task is the sum over the rank's
layers; a decode task is priced at its own past length, so decode time grows with the step.
A rank's memory is `Placement.bytes_per_tier()`, never derived another way.

Pipelines: P ranks each keep P blocks in flight. For a group of m blocks, each token step
takes max(m * the slowest rank's task, the sum of all ranks' tasks and sends): every rank must
do m tasks per step, and a block's token must go round the ring once. Sends run beside compute
(isend) on a link of `link_bw` bytes/s: the hardware description has no such field, so
DEFAULT_LINK_BW (10 Gbit/s Ethernet, a slow inter-node link) is assumed unless given.

Throughput as in the paper: generated tokens / (prefill + decode time) of the whole workload:
num_prompts prompts in ceil(num_prompts / bls) blocks (the padding of the last one is paid for,
not counted), or without num_prompts one full group of P blocks (the steady state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .cost_terms import Work, act_work, cache_work, matmul_work, send_seconds, weight_work
from ..machine.hardware import Hardware
from ..spec.layout import UnitKind
from .placement import Placement, Tier

DEFAULT_LINK_BW = 1.25e9  # bytes/s between ranks: 10 Gbit/s Ethernet (assumed, see the docstring)


@dataclass(frozen=True)
class LayerTime:
    """One unit of a rank (standing for `count` identical layers) in one task."""

    layer_idx: int
    kind: str  # "embed", "block" or "head"
    count: int  # identical layers it stands for (1 unless the placement was folded: see `repeats`)
    act_stores: int  # of those, how many hand their hidden state to a next layer on this rank
    work: Work  # one layer, hidden-state hand-off included
    seconds: float  # one layer, hidden-state hand-off included
    total_s: float  # all `count` layers


@dataclass(frozen=True)
class TaskTime:
    """One task (a token step of a block) on one rank."""

    token_idx: float  # 0: the prefill; n / 2 for the mean decode step
    layers: tuple[LayerTime, ...]
    seconds: float  # the layers, overlap applied per layer
    send_s: float  # messages to the next rank, beside compute
    compute_s: float  # summed over the layers: the compute path ...
    load_s: float  # ... and the load path (what the "bound" of a step compares)
    work: Work  # summed over the layers

    @property
    def bound(self) -> str:
        """What limits this step: "compute" or "load"."""
        return "compute" if self.compute_s >= self.load_s else "load"


@dataclass(frozen=True)
class StageTimes:
    """Every task of one block on one rank, and its memory."""

    prefill: TaskTime
    decode_steps: tuple[TaskTime, ...]  # tokens 1 .. n-1
    mean_decode: TaskTime | None  # the decode task at the mean past length (None: no decode step)
    peak_bytes: dict[Tier, int]

    def tasks(self) -> tuple[TaskTime, ...]:
        return (self.prefill, *self.decode_steps)


@dataclass(frozen=True)
class Estimate:
    prefill: TaskTime  # one prefill task on the slowest rank
    decode: TaskTime | None  # the mean decode step (past = s + n/2 - 1) on the slowest rank
    prefill_s: float  # the whole workload
    decode_s: float
    block_s: float  # latency of one block: its group's time from prefill to last token
    num_blocks: int
    generated_tokens: int
    throughput: float  # tokens/s
    peak_bytes: tuple[dict[Tier, int], ...]  # per rank: Placement.bytes_per_tier()
    stages: tuple[StageTimes, ...]
    slowest_rank: int

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def longest_task_s(self) -> float:
        """The longest task of any rank, its sends included (they run beside it): what a rank may
        wait for its peer to finish before a message comes (parallel/comm.py, `wait_for_tasks`)."""
        return max(max(t.seconds, t.send_s) for stage in self.stages for t in stage.tasks())


# --- one rank ------------------------------------------------------------------------------------


def task_time(p: Placement, hardware: Hardware, token_idx: float, *, repeats: Mapping[int, int] | None = None,
              link_bw: float = DEFAULT_LINK_BW) -> TaskTime:
    """One task on the rank of placement `p`. token_idx may be fractional (the mean decode step).

    repeats: layer_idx -> how many identical layers that unit stands for (the search plans one
    representative of a run of identical decoder layers); 1 for units not named."""
    speeds, separate, overlap = hardware.speeds, p.buffers.separate_gpu, p.policy.overlap
    units = p.units
    last_idx = units[-1].layer_idx
    act = act_work(p, speeds, token_idx)
    weights_cache: dict[tuple, Work] = {}  # identical units share one evaluation
    layers, total, compute_s, load_s, work_sum = [], 0.0, 0.0, 0.0, Work()
    for unit in units:
        key = _signature(p, unit)
        if key not in weights_cache:
            work = weight_work(p, speeds, unit.layer_idx, token_idx) + matmul_work(p, speeds, unit, token_idx)
            if unit.has_cache:
                work = work + cache_work(p, speeds, unit.layer_idx, token_idx)
            weights_cache[key] = work
        work = weights_cache[key]
        count = repeats.get(unit.layer_idx, 1) if repeats else 1
        stores = count - (1 if unit.layer_idx == last_idx else 0)
        with_act = work + act
        one_with = with_act.seconds(overlap=overlap, separate_gpu=separate)
        one_without = work.seconds(overlap=overlap, separate_gpu=separate)
        group_s = stores * one_with + (count - stores) * one_without
        group_work = with_act.scaled(stores) + work.scaled(count - stores)
        shown = with_act if stores else work
        layers.append(LayerTime(unit.layer_idx, unit.kind.value, count, stores, shown,
                                one_with if stores else one_without, group_s))
        total += group_s
        compute_s += group_work.compute_path(separate)
        load_s += group_work.load_path(separate)
        work_sum = work_sum + group_work
    send = send_seconds(p, token_idx, link_bw, last_stage=units[-1].kind is UnitKind.HEAD)
    return TaskTime(token_idx, tuple(layers), total, send, compute_s, load_s, work_sum)


def _signature(p: Placement, unit) -> tuple:
    """Units with equal signatures cost the same in a task (same shapes, tiers and caches)."""
    weights = tuple((w.name, w.shape, w.tier, w.nbytes, w.compressed) for w in p.weights[unit.layer_idx])
    caches = ()
    if unit.has_cache:
        caches = tuple((c.k_tier, c.v_tier, c.in_place, c.k_nbytes, c.v_nbytes) for c in
                       (p.caches[(unit.layer_idx, b)] for b in range(p.policy.num_gpu_batches)))
    return unit.kind, weights, caches


def stage_times(p: Placement, hardware: Hardware, *, repeats: Mapping[int, int] | None = None,
                link_bw: float = DEFAULT_LINK_BW, peak_bytes: dict[Tier, int] | None = None) -> StageTimes:
    """Every task of one block on this rank. peak_bytes: the rank's bytes per tier when `p` is
    folded (see `repeats`); by default `p.bytes_per_tier()`."""
    tasks = [task_time(p, hardware, t, repeats=repeats, link_bw=link_bw) for t in range(p.workload.gen_len)]
    mean = mean_decode_task(p, hardware, repeats=repeats, link_bw=link_bw)
    return StageTimes(tasks[0], tuple(tasks[1:]), mean, peak_bytes if peak_bytes is not None else p.bytes_per_tier())


# --- the workload, over every rank -----------------------------------------------------------------


def combine(stages: Sequence[StageTimes], *, block_size: int, gen_len: int, num_prompts: int | None) -> Estimate:
    """The workload's times from every rank's tasks (see the module docstring for the rule)."""
    num_ranks = len(stages)
    num_blocks = math.ceil(num_prompts / block_size) if num_prompts else num_ranks
    groups = [min(num_ranks, num_blocks - start) for start in range(0, num_blocks, num_ranks)]
    steps = [stage.tasks() for stage in stages]

    def step_s(token_idx: int, in_group: int) -> float:
        tasks = [rank_tasks[token_idx] for rank_tasks in steps]
        busiest = max(max(t.seconds, t.send_s) for t in tasks)
        ring = sum(t.seconds + t.send_s for t in tasks)
        return max(in_group * busiest, ring)

    prefill_s = sum(step_s(0, m) for m in groups)
    decode_s = sum(step_s(t, m) for m in groups for t in range(1, gen_len))
    full = groups[0]
    block_s = sum(step_s(t, full) for t in range(gen_len))
    tokens = (num_prompts if num_prompts else num_blocks * block_size) * gen_len
    rank_s = [sum(max(t.seconds, t.send_s) for t in rank_tasks) for rank_tasks in steps]
    slowest = max(range(num_ranks), key=rank_s.__getitem__)
    return Estimate(
        prefill=stages[slowest].prefill, decode=stages[slowest].mean_decode, prefill_s=prefill_s, decode_s=decode_s,
        block_s=block_s, num_blocks=num_blocks, generated_tokens=tokens, throughput=tokens / (prefill_s + decode_s),
        peak_bytes=tuple(stage.peak_bytes for stage in stages), stages=tuple(stages), slowest_rank=slowest,
    )


def estimate_pipeline(placements: Sequence[Placement], hardware: Hardware, num_prompts: int | None = None, *,
                      link_bw: float = DEFAULT_LINK_BW) -> Estimate:
    """The workload on a pipeline whose rank r has placement placements[r] (one entry: one rank)."""
    if not placements:
        raise ValueError("estimate_pipeline needs one placement per rank")
    first = placements[0]
    stages = [stage_times(p, hardware, link_bw=link_bw) for p in placements]
    return combine(stages, block_size=first.policy.block_size, gen_len=first.workload.gen_len, num_prompts=num_prompts)


def estimate(placement: Placement, hardware: Hardware, num_prompts: int | None = None, *,
             link_bw: float = DEFAULT_LINK_BW) -> Estimate:
    """The workload on one rank with this placement. With buffers.num_ranks = P > 1, as if every
    one of the P stages were this one (use `estimate_pipeline` with every rank's placement)."""
    return estimate_pipeline([placement] * placement.buffers.num_ranks, hardware, num_prompts, link_bw=link_bw)


def mean_decode_task(p: Placement, hardware: Hardware, *, repeats: Mapping[int, int] | None = None,
                     link_bw: float = DEFAULT_LINK_BW) -> TaskTime | None:
    """The decode task at the mean past length (token n / 2): every term is linear in the past
    length, so its work is the mean decode step's (its max() per layer is not exactly the mean's)."""
    n = p.workload.gen_len
    return task_time(p, hardware, n / 2, repeats=repeats, link_bw=link_bw) if n > 1 else None


# --- stage partition --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionCosts:
    """Arguments of parallel.partition.partition_layers: predicted seconds of one block."""

    layer_costs: list[float]  # each decoder layer
    first_extra: float  # the embedding (stage 0)
    last_extra: float  # the head (the last stage)


def partition_costs(whole: Placement, hardware: Hardware) -> PartitionCosts:
    """Predicted seconds per block of every unit of a placement of the WHOLE model (one policy
    for all), so stages are balanced by time, not by parameter count: the embedding costs its
    load only (a lookup), the head its vocabulary matmul. Hidden-state hand-offs are counted on
    each layer, which makes the cost of a stage the sum of its layers'."""
    per_unit: dict[int, float] = {}
    for t in range(whole.workload.gen_len):
        for lt in task_time(whole, hardware, t).layers:
            per_unit[lt.layer_idx] = per_unit.get(lt.layer_idx, 0.0) + lt.seconds
    kinds = {unit.layer_idx: unit.kind for unit in whole.units}
    blocks = [per_unit[i] for i in sorted(per_unit) if kinds[i] is UnitKind.BLOCK]
    first = sum(per_unit[i] for i in per_unit if kinds[i] is UnitKind.EMBED)
    last = sum(per_unit[i] for i in per_unit if kinds[i] is UnitKind.HEAD)
    return PartitionCosts(blocks, first, last)
