"""Choosing a rank's placement: the policy search by default, or a hand-given policy checked.

`make_plan` is what `LLM` (and `--print-policy`, which stops there) calls before any weight is
placed. It starts from this machine's hardware (capacities detected now, speeds profiled once and
cached; or `--hardware FILE.json`), takes this rank's share of the node, applies `--gpu-mem` /
`--cpu-mem` / `--disk-mem`, and then either searches (planning/search.py) or checks the given
policy against the capacities (planning/fit.py: a policy that does not fit is refused naming the
tier, the bytes and the nearest policy that fits). Ranks of a pipeline agree on the hardware they
plan with (the smallest of each capacity), so they all choose the same block shape, and their
stages are cut by predicted time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..machine import detect
from ..planning.cost_model import Estimate, estimate, estimate_pipeline, partition_costs
from ..planning.fit import check_policy, policy_flags
from ..machine.hardware import Hardware, apply_overrides, rank_share
from ..spec.layout import Unit, model_units
from ..planning.place import plan_placement
from ..planning.placement import Buffers, Dtypes, Placement, Tier, Workload
from ..planning.policy import Policy
from ..planning.search import SearchOptions, search
from ..sizes import format_size
from ..spec.model import ModelSpec
from ..planning.tiers import DTYPE_BYTES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capacity:
    """What a rank may use, over what is detected (None: detected), and where speeds come from."""

    gpu_mem: int | None = None
    """Bytes of the gpu tier (`--gpu-mem`)."""
    cpu_mem: int | None = None
    """Bytes of the cpu tier (`--cpu-mem`)."""
    disk_mem: int | None = None
    """Bytes of the offload folder (`--disk-mem`)."""
    hardware: str | Path | None = None
    """A hardware description (JSON file or preset name, `--hardware`) to plan for instead of this machine."""

    def __post_init__(self) -> None:
        for name in ("gpu_mem", "cpu_mem", "disk_mem"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise UserError(f"--{name.replace('_', '-')} must be a size >= 0, got {value!r}")


@dataclass(frozen=True)
class ModelSetup:
    """How a model is placed and run: everything `LLM` takes besides the model, the plan and the
    pipeline (its keywords, by the same names). Built once from the flags (cli/flags.py) or by a
    caller of the API; `for_workload` sizes it for the prompts of a run."""

    runtime: object = None
    """A `Runtime` (api/runtime.py: device, dtypes, prefetch, disk reads, the workload)."""
    policy: Policy | None = None
    """A fixed policy, checked against memory; None: the planner chooses."""
    base: Policy | None = None
    """With policy None, the settings the planner keeps."""
    search: SearchOptions = SearchOptions()
    capacity: Capacity = Capacity()
    offload_dir: str | Path | None = None

    def for_workload(self, workload: Workload | None, num_prompts: int | None = None,
                     scoring: bool = False) -> "ModelSetup":
        """This setup planned for prompts of `workload`'s size (`num_prompts` of them)."""
        runtime = dataclasses.replace(self.runtime, workload=workload, num_prompts=num_prompts,
                                      scoring=scoring or self.runtime.scoring)
        return dataclasses.replace(self, runtime=runtime)

    def llm_kwargs(self) -> dict:
        """`LLM`'s keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def plan(self, spec: ModelSpec, pipeline=None) -> "PlanChoice":
        """The plan `LLM` would make (for --print-policy, or to hand to `LLM(plan=...)`)."""
        return plan_for(spec, runtime=self.runtime, policy=self.policy, capacity=self.capacity, options=self.search,
                        offload_dir=self.offload_dir, pipeline=pipeline, base=self.base)


@dataclass(frozen=True)
class PlanChoice:
    """The rank's placement, every rank's units and the prediction, for the log and --print-policy."""

    placement: Placement
    units: list[Unit]
    estimate: Estimate
    hardware: Hardware
    searched: bool
    process_rss: int = 0  # bytes the process held in host memory when the plan was made (runtime, tokenizer)
    dtype_note: str = ""  # how the compute dtype was chosen, when there was a choice

    @property
    def predicted_peak_rss(self) -> int:
        """The process's peak in host memory: what it held already, plus every planned host byte
        (without a GPU the gpu tier is host memory too)."""
        used = self.placement.bytes_per_tier()
        host = used[Tier.CPU] + (0 if self.hardware.capacities.has_gpu else used[Tier.GPU])
        return self.process_rss + host

    def summary(self) -> str:
        """The chosen policy, the planned peak per tier against the capacity, the prediction."""
        p, hw, est = self.placement, self.hardware, self.estimate
        used = p.bytes_per_tier()
        caps = {Tier.GPU: hw.capacities.gpu_mem, Tier.CPU: hw.capacities.cpu_mem, Tier.DISK: hw.capacities.disk_mem}
        memory = ", ".join(f"{tier} {format_size(used[tier])} of {format_size(caps[tier])}" for tier in Tier)
        how = "chosen by the planner" if self.searched else "as given"
        step = est.decode
        bound = (f"; a decode step {step.seconds:.3g} s, {step.bound}-bound (compute {step.compute_s:.3g} s, "
                 f"loads {step.load_s:.3g} s)") if step is not None else ""
        return (f"policy ({how}): {policy_flags(p.policy)}\n"
                f"compute dtype: {p.dtypes.compute} (weights stored in {p.dtypes.storage}){self.dtype_note}\n"
                f"planned peak memory: {memory}; process peak {format_size(self.predicted_peak_rss)} of host memory\n"
                f"predicted: {est.throughput:.4g} tokens/s ({est.num_blocks} block(s), prefill {est.prefill_s:.3g} s, "
                f"decode {est.decode_s:.3g} s{bound})\n"
                f"hardware: {hw.name}")

    def log_line(self) -> str:
        p = self.placement.policy
        where = ", ".join(f"{tier} {format_size(n)}" for tier, n in self.placement.weight_bytes().items() if n)
        return (f"policy {policy_flags(p)} (block {p.gpu_batch_size}x{p.num_gpu_batches}; weights: {where}; "
                f"compute {self.placement.dtypes.compute}{self.dtype_note}; predicted {self.estimate.throughput:.2f} tok/s)")


def rank_hardware(capacity: Capacity, *, device: str, offload_dir: str | Path | None, compute_dtype: str,
                  local_world_size: int, pipeline=None) -> Hardware:
    """This rank's hardware: the machine's (or `--hardware`), its share of the node, the overrides;
    in a pipeline, the smallest of every rank's capacities (so all ranks plan alike).

    Detected capacities are shared: host RAM and disk among the node's ranks, a GPU among the
    local ranks that run on it; then the rank's GPU reserve (CUDA context, cuBLAS, NCCL:
    `detect.gpu_reserve`) comes off its share. A `--hardware` description is planned as written."""
    from .. import profile  # torch: only when planning for this machine

    def this_rank() -> Hardware:
        hw = profile.machine_hardware(device, offload_dir, hardware=capacity.hardware, compute_dtype=compute_dtype)
        if capacity.hardware is None:
            hw = _detected_share(hw, local_world_size, pipeline)
        hw = apply_overrides(hw, gpu_mem=capacity.gpu_mem, cpu_mem=capacity.cpu_mem, disk_mem=capacity.disk_mem)
        if offload_dir is None:  # no offload folder: no disk tier
            hw = hw.with_capacities(dataclasses.replace(hw.capacities, disk_mem=0))
        return hw

    if pipeline is None or pipeline.world_size == 1:
        return this_rank()
    # a rank whose folder or sizes are wrong stops every rank with its line
    hw, every = pipeline.together(this_rank, what="capacities", share=lambda hw: hw.capacities)
    smallest = {name: min(getattr(c, name) for c in every) for name in ("gpu_mem", "cpu_mem", "host_mem", "disk_mem")}
    return hw.with_capacities(dataclasses.replace(hw.capacities, **smallest))


def _detected_share(hw: Hardware, local_world_size: int, pipeline) -> Hardware:
    ctx = pipeline.ctx if pipeline is not None else None
    if not hw.capacities.has_gpu:
        return rank_share(hw, local_world_size=local_world_size)
    sharing = detect.ranks_per_gpu(ctx.local_rank if ctx else 0, local_world_size, detect.cuda_device_count())
    hw = rank_share(hw, local_world_size=local_world_size, ranks_per_gpu=sharing)
    reserve = detect.gpu_reserve(context_created=detect.cuda_context_created(), backend=ctx.backend if ctx else None,
                                 world_size=ctx.world_size if ctx else 1)
    c = hw.capacities
    log.info("GPU memory reserved outside the plan (CUDA context, kernels, cuBLAS%s): %s of %s%s",
             ", NCCL" if ctx and ctx.backend == "nccl" else "", format_size(reserve), format_size(c.gpu_mem),
             f" (this rank's 1/{sharing} of the GPU)" if sharing > 1 else "")
    return hw.with_capacities(dataclasses.replace(c, gpu_mem=max(0, c.gpu_mem - reserve)))


def plan_for(spec: ModelSpec, *, runtime, policy: Policy | None, capacity: Capacity, options: SearchOptions,
             offload_dir: str | Path | None, pipeline=None, base: Policy | None = None) -> PlanChoice:
    """This rank's plan for `runtime`'s device, dtypes and workload: the planner's choice when
    `policy` is None (`base` fixes what it may not change), else `policy` checked."""
    device = runtime.resolve_device()
    if spec.stored_groups is not None:
        policy, base = (None if p is None else with_stored_groups(spec, p) for p in (policy, base or Policy()))
    if policy is not None:
        on_disk = [kind for kind, pct in (("weights", policy.percents("w")), ("KV cache", policy.percents("cache")),
                                          ("activations", policy.percents("act"))) if pct[2] > 0]
        if on_disk and offload_dir is None:
            raise UserError(f"the policy puts {', '.join(on_disk)} on disk but no offload folder was given; "
                            "pass offload_dir (CLI: --offload-dir DIR)")
    active = pipeline if pipeline is not None and pipeline.world_size > 1 else None
    io = runtime.disk_io
    buffers = Buffers(separate_gpu=device.type == "cuda", prefetch_depth=runtime.prefetch_depth,
                      io_threads=io.threads, chunk_bytes=io.chunk_bytes, num_ranks=active.world_size if active else 1,
                      scoring=runtime.scoring)
    choices = runtime.dtype_choices(spec, device)
    if capacity.hardware is not None:  # a description's speeds are of one dtype: compare nothing
        choices = [d for d in choices if d.compute == _described_dtype(capacity.hardware)] or choices[:1]

    def plan_in(dtypes: Dtypes) -> PlanChoice:
        hardware = rank_hardware(capacity, device=str(device), offload_dir=offload_dir, compute_dtype=dtypes.compute,
                                 local_world_size=active.ctx.local_world_size if active else 1, pipeline=active)
        return make_plan(spec, policy=policy, hardware=hardware, dtypes=dtypes, workload=runtime.workload_for(spec),
                         buffers=buffers, num_prompts=runtime.num_prompts, options=options,
                         rank=active.rank if active else 0, stage_layers=pipeline.stage_layers if pipeline else None,
                         base=base)

    choice = choose_dtype(choices, plan_in, pipeline=active, checkpoint_dtype=spec.dtype)
    import psutil

    return dataclasses.replace(choice, process_rss=psutil.Process().memory_info().rss)


def with_stored_groups(spec: ModelSpec, policy: Policy) -> Policy:
    """`policy` with the compression of the groups the checkpoint holds (a GGUF's Q4_0 / Q4_1 /
    Q8_0 tensors): their bits and group size, so they are placed and loaded as they are, never
    quantized again. A compressed KV cache or other compressed weights take the same settings."""
    groups, config = spec.stored_groups, policy.compression
    if (config.bits, config.group_size) == (groups.bits, groups.group_size):
        return policy
    if policy.compress_weight or policy.compress_cache:
        log.info("the checkpoint holds %d-bit groups of %d: compression uses them (not %d-bit groups of %d)",
                 groups.bits, groups.group_size, config.bits, config.group_size)
    return policy.replace(compression=dataclasses.replace(config, bits=groups.bits, group_size=groups.group_size))


def choose_dtype(choices: list[Dtypes], plan_in, pipeline=None, checkpoint_dtype: str | None = None) -> PlanChoice:
    """The plan of the compute dtype with the highest predicted throughput (each planned with
    this machine's profile in that dtype: matmuls, attention and elementwise passes in 16 bits
    may be several times faster or slower than in fp32, and fp32 slots take twice the bytes).
    A dtype whose plan does not fit loses; if none fits, the first one's error is raised. The
    ranks of a pipeline choose together: the dtype whose slowest rank is fastest."""
    if len(choices) == 1:
        return plan_in(choices[0])
    plans: dict[str, PlanChoice] = {}
    first_error: UserError | None = None
    for dtypes in choices:
        try:
            plans[dtypes.compute] = plan_in(dtypes)
        except UserError as exc:
            first_error = first_error or exc
    predicted = {name: plan.estimate.throughput for name, plan in plans.items()}
    if pipeline is not None:  # every rank must compute in the same dtype: activations cross ranks
        every = pipeline.gather(predicted)
        predicted = {name: min(rank.get(name, 0.0) for rank in every) for name in predicted}
        predicted = {name: value for name, value in predicted.items() if value > 0}
    if not predicted:
        raise first_error
    best = max(predicted, key=predicted.get)
    others = ", ".join(f"{name} {value:.4g} tok/s" for name, value in predicted.items() if name != best)
    refused = [d.compute for d in choices if d.compute not in plans]
    rounds = plans[best].placement.dtypes
    note = f" (chosen by the profile: {best} {predicted[best]:.4g} tok/s predicted"
    checkpoint = checkpoint_dtype if checkpoint_dtype in DTYPE_BYTES else rounds.storage
    if rounds.compute != "float32" and rounds.compute != checkpoint:
        note = f" (rounds the {checkpoint} weights; " + note.removeprefix(" (")
    note += f" against {others}" if others else ""
    note += f"; {', '.join(refused)} does not fit" if refused else ""
    log.info("compute dtype %s%s", best, note + ")")
    return dataclasses.replace(plans[best], dtype_note=note + ")")


def _described_dtype(hardware: str | Path) -> str:
    from .. import profile

    return profile.machine_hardware("cpu", None, hardware=hardware).speeds.compute_dtype


def make_plan(spec: ModelSpec, *, policy: Policy | None, hardware: Hardware, dtypes: Dtypes, workload: Workload,
              buffers: Buffers, num_prompts: int | None, options: SearchOptions, rank: int = 0,
              stage_layers: list[int] | None = None, base: Policy | None = None) -> PlanChoice:
    """The placement of rank `rank` of `buffers.num_ranks`: searched when `policy` is None, else
    `policy` checked against the hardware's capacities (`PolicyDoesNotFit`, a UserError)."""
    all_units = model_units(spec)
    num_ranks = buffers.num_ranks
    guide = policy or base or Policy()
    stages = _stages(spec, all_units, guide, hardware, dtypes, workload, num_ranks, stage_layers)
    if policy is None:
        plan = search(spec, stages, hardware, dtypes=dtypes, workload=workload, buffers=buffers,
                      num_prompts=num_prompts, base=base or Policy(), options=options)
        placement = plan.placements[rank] if num_ranks > 1 else plan.placement
        return PlanChoice(placement, stages[rank], plan.estimate, hardware, searched=True)
    placements = [plan_placement(spec, units, policy, dtypes=dtypes, workload=workload, buffers=buffers) for units in stages]
    check_policy(placements[rank], hardware, link_bw=options.link_bw)
    est = estimate_pipeline(placements, hardware, num_prompts, link_bw=options.link_bw) if num_ranks > 1 \
        else estimate(placements[0], hardware, num_prompts)
    return PlanChoice(placements[rank], stages[rank], est, hardware, searched=False)


def _stages(spec, all_units, guide: Policy, hardware, dtypes, workload, num_ranks, stage_layers) -> list[list[Unit]]:
    """Every rank's contiguous slice: the embedding on the first, the head on the last; cut by
    predicted time (of the guide policy on the whole model), or as `--stage-layers` says."""
    if num_ranks == 1:
        if stage_layers not in (None, [spec.num_layers]):
            raise UserError("--stage-layers needs one entry per rank; with one process, drop it")
        return [all_units]
    from ..parallel.partition import partition_layers  # several ranks: a single process loads no partition

    whole = plan_placement(spec, all_units, guide, dtypes=dtypes, workload=workload,
                           buffers=Buffers(separate_gpu=hardware.capacities.has_gpu))
    costs = partition_costs(whole, hardware)
    ranges = partition_layers(costs.layer_costs, num_ranks, first_extra=costs.first_extra,
                              last_extra=costs.last_extra, override=stage_layers)
    embed, blocks, head = all_units[0], all_units[1:-1], all_units[-1]
    return [([embed] if r == 0 else []) + [blocks[i] for i in ranges[r]] + ([head] if r == num_ranks - 1 else [])
            for r in range(num_ranks)]


def block_for(policy: Policy, num_prompts: int) -> Policy:
    """A planned block shrunk to the prompts there are, when one block would otherwise be mostly
    padding: first fewer GPU batches (a batch of one row computes as slowly as a full one), then
    fewer rows per batch. Never more memory than planned; the same outputs."""
    if num_prompts >= policy.block_size:
        return policy
    batches = min(policy.num_gpu_batches, math.ceil(num_prompts / policy.gpu_batch_size))
    return policy.replace(num_gpu_batches=batches, gpu_batch_size=math.ceil(num_prompts / batches))
