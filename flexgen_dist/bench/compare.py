"""Ours against transformers and Accelerate on the same model, workload and memory cap.

Every system runs as its own child process (ours: `python -m flexgen_dist.run`; the baselines:
`python -m flexgen_dist.bench.baselines`), under the same cgroup memory cap when one is given,
with the checkpoint and offload files evicted from the page cache first, so disk offloading is
measured against the disk and not against RAM. Each system runs in every compute dtype the bench
chose (bound.py: those this machine computes well), in each at increasing batches until one no
longer fits; its best dtype and batch are reported. Each of our runs is held against the cost model's
bound for the policy it used (bound.py), and our best block is run once more with everything in
memory, so the cost of offloading is one ratio.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..planning.policy import Policy
from ..sizes import format_size
from .bound import BoundModel, BoundModels, policy_from_stats
from .memlimit import evict_from_page_cache, run_limited
from .report import policy_text_from_stats
from .runs import Attempt, best_batch, run_baseline

IN_MEMORY_PERCENT = ("100", "0", "100", "0", "100", "0")  # --percent: everything on the compute device
IN_MEMORY = "ours-in-memory"  # the system name of that run in lines, tables and JSON


@dataclass(frozen=True)
class Workload:
    model_dir: Path
    prompt_len: int
    gen_len: int
    mem_limit: int | None  # cgroup cap for every system (None: none)
    budget: int | None  # bytes each system may place in RAM (Accelerate's max_memory; our tiers)
    offload_dir: Path
    seed: int = 0
    ours_args: tuple[str, ...] = ()  # flags of `flexgen_dist.run` given to every run of ours (e.g. compression)


@dataclass(frozen=True)
class OursRun:
    """How one run of our engine is set up."""

    block: tuple[int, int] | None  # (gpu batch size, gpu batches); None: the child's policy decides
    percent: tuple[str, ...] | None = None  # --percent's six numbers; None: fitted to the budget
    use_budget: bool = True  # pass the workload's budget as --gpu-mem / --cpu-mem
    capped: bool = True  # run under the workload's memory cap
    system: str = "ours"
    label: str = ""  # for people; default: the block, e.g. "8x1"
    extra_args: tuple[str, ...] = ()  # more flags of `flexgen_dist.run` (the sweep's planner points)
    compute_dtype: str | None = None  # run's --compute-dtype (float32, bfloat16, auto, ...); None: its default
    num_prompts: int | None = None  # with no block: the prompts of the run (None: run's default)

    @property
    def name(self) -> str:
        return self.label or (f"{self.block[0]}x{self.block[1]}" if self.block else "auto")


def child_env() -> dict:
    """The same environment for every system. glibc's dynamic mmap threshold lets the heap of a
    process that allocates and frees layer-sized buffers fragment until a capped run is OOM-killed
    (seen with Accelerate at batch 32 under 4 GiB: 5 GiB of heap for 2 GiB of live data); a fixed
    4 MiB threshold returns such buffers to the system. Applied to all systems alike."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "4194304"}


def ours_command(w: Workload, run: OursRun, stats_path: Path) -> list[str]:
    cmd = [
        sys.executable, "-m", "flexgen_dist.run", "--model", str(w.model_dir),
        "--prompt-len", str(w.prompt_len), "--gen-len", str(w.gen_len), "--seed", str(w.seed),
        "--ignore-eos", "--stats-json", str(stats_path), "--offload-dir", str(w.offload_dir / "ours"),
    ]
    if run.block is not None:
        gbs, ngb = run.block
        # One block per run: its time from prefill to last token is the run's (the sweep's latency).
        cmd += ["--num-prompts", str(gbs * ngb), "--gpu-batch-size", str(gbs), "--num-gpu-batches", str(ngb)]
    elif run.num_prompts is not None:
        cmd += ["--num-prompts", str(run.num_prompts)]
    if run.percent is not None:
        cmd += ["--percent", *run.percent]
    if run.compute_dtype is not None:
        cmd += ["--compute-dtype", run.compute_dtype]
    if run.use_budget and w.budget is not None:
        # On a machine without a GPU both tiers are RAM: half the budget each (the gpu tier holds
        # copies in the compute dtype, the cpu tier in the checkpoint's); the rest goes to disk. The
        # same RAM as Accelerate's max_memory, and the cap's other 1.5 GiB left to the process and
        # the page cache (planning to the cgroup's own limit, 3.7 of 4 GiB, left the kernel
        # reclaiming the page cache on every disk read: decode 5x slower).
        cmd += ["--gpu-mem", str(w.budget // 2), "--cpu-mem", str(w.budget // 2)]
    extra = _without_percent(w.ours_args) if run.percent is not None else w.ours_args
    return cmd + list(extra) + list(run.extra_args)


def _without_percent(flags: tuple[str, ...]) -> tuple[str, ...]:
    """--ours-flags less a --percent: a run with a placement of the bench's own (everything in
    memory) keeps it; given after it, the user's placement silently replaced it."""
    out, skip = [], 0
    for flag in flags:
        if skip:
            skip -= 1
        elif flag == "--percent":
            skip = 6
        elif not flag.startswith("--percent="):
            out.append(flag)
    return tuple(out)


def run_ours(w: Workload, run: OursRun, bounds: BoundModels | None = None) -> Attempt:
    """One run of our engine as its own child; `bounds` gives the bound of the policy it reports,
    computed for the dtype it computed in."""
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "stats.json"
        cmd = ours_command(w, run, stats_path)
        evict_from_page_cache([w.model_dir, w.offload_dir])
        child = run_limited(cmd, mem_limit=w.mem_limit if run.capped else None, env=child_env())
        batch = run.block[0] * run.block[1] if run.block else 0
        attempt = Attempt(system=run.system, batch=batch, ok=False, label=run.name, oom_killed=child.oom_killed,
                          peak_rss_bytes=child.peak_rss_bytes, peak_cgroup_bytes=child.peak_cgroup_bytes,
                          limit_method=child.limit_method, command=cmd, stderr_tail=child.stderr[-4000:],
                          dtype=run.compute_dtype or "")
        if not child.ok:
            attempt.error = child.describe_failure()
            return attempt
        stats = json.loads(stats_path.read_text())
    p = stats["policy"]
    # What it computed in: the plan says (an `auto` run chose), else what was asked.
    computed = stats.get("planned", {}).get("dtypes", {}).get("compute") or run.compute_dtype
    attempt.dtype = computed or ""
    block = p["gpu_batch_size"] * p["num_gpu_batches"]
    attempt.batch = block
    attempt.ok = True
    attempt.result = {
        "system": run.system,
        "batch": block,
        "policy": policy_text_from_stats(p),
        "policy_fields": p,
        # prompts / block size: 1 whenever the block was given (--num-prompts is one block)
        "num_blocks": -(-stats["prompt_tokens"] // (w.prompt_len * block)),
        "prefill_tokens_per_s": stats["prefill_tokens_per_s"],
        "decode_tokens_per_s": stats["decode_tokens_per_s"],
        "total_tokens_per_s": stats["tokens_per_s"],
        "prefill_s": stats["prefill_s"],
        "decode_s": stats["decode_s"],
        "dtype": attempt.dtype,
    }
    if bounds is not None:
        try:
            attempt.bound = bounds.for_dtype(computed if computed != "auto" else None).bound(policy_from_stats(p))
        except (ValueError, TypeError, KeyError) as e:  # the run's numbers stand without it
            attempt.bound_error = f"{type(e).__name__}: {e}"
    return attempt


def best_ours(w: Workload, blocks: list[tuple[int, int]], bounds: BoundModels | None = None, *,
              dtype: str | None = None, auto_prompts: int | None = None,
              on_attempt: Callable[[Attempt], None] | None = None) -> tuple[Attempt | None, list[Attempt]]:
    """Blocks (gpu batch size, gpu batches) tried in order of size while they fit, computing in
    `dtype` (run's --compute-dtype; None: its default), each fitted to the budget; then, with
    `auto_prompts`, one run of that many prompts as a user would start it under the cap: no
    block, no capacities, the planner sizing both from the memory it detects (the cgroup's limit
    less its page-cache reserve). Accelerate's budget bounds only its weights; ours bounds
    weights, cache and buffers together, so this run is the like-for-like one."""
    by_size = {gbs * ngb: (gbs, ngb) for gbs, ngb in blocks}
    best, attempts = best_batch(lambda size: run_ours(w, OursRun(block=by_size[size], compute_dtype=dtype), bounds),
                                by_size, on_attempt=on_attempt)
    if auto_prompts is None:
        return best, attempts
    auto = run_ours(w, OursRun(block=None, use_budget=False, label="auto", compute_dtype=dtype,
                               num_prompts=auto_prompts), bounds)
    attempts.append(auto)
    if on_attempt is not None:
        on_attempt(auto)
    if auto.ok and (best is None or auto.tokens_per_s > best.tokens_per_s):
        best = auto
    return best, attempts


def in_memory_run(w: Workload, block: tuple[int, int], bounds: BoundModel,
                  compute_dtype: str | None = None) -> tuple[OursRun, str]:
    """Our engine at `block` in `compute_dtype` with everything on the compute device (`bounds`:
    the bound model of that dtype), and a note saying whether it runs under the memory cap: it
    does when its planned bytes fit the budget the offloaded runs were given, else it runs
    without the cap (it would be OOM-killed under it)."""
    uncapped = OursRun(block=block, percent=IN_MEMORY_PERCENT, use_budget=False, capped=False, system=IN_MEMORY,
                       compute_dtype=compute_dtype)
    if w.mem_limit is None:
        return uncapped, "no memory cap (none was asked for)"
    planned = sum(bounds.placement(Policy(gpu_batch_size=block[0], num_gpu_batches=block[1])).bytes_per_tier().values())
    room = w.budget if w.budget is not None else w.mem_limit
    if planned <= room:
        return (OursRun(block=block, percent=IN_MEMORY_PERCENT, use_budget=False, capped=True, system=IN_MEMORY,
                        compute_dtype=compute_dtype),
                f"under the same {format_size(w.mem_limit)} cap (its {format_size(planned)} fit the budget)")
    return uncapped, (f"WITHOUT the {format_size(w.mem_limit)} cap: its {format_size(planned)} do not fit "
                      f"the {format_size(room)} budget")


def best_baseline(system: str, w: Workload, batches: list[int], *, dtype: str | None = None,
                  on_attempt: Callable[[Attempt], None] | None = None) -> tuple[Attempt | None, list[Attempt]]:
    """A baseline at `batches` in increasing order while they fit, computing in `dtype` (None: the
    child's default)."""
    def one(batch: int) -> Attempt:
        # One offload folder per dtype: Accelerate writes its disk-tier weights in the compute dtype.
        folder = w.offload_dir / ("accelerate" + (f"-{dtype}" if dtype else ""))
        return run_baseline(
            system, w.model_dir, batch, w.prompt_len, w.gen_len,
            max_memory=w.budget if system == "accelerate" else None,
            offload_folder=folder if system == "accelerate" else None, dtype=dtype,
            seed=w.seed, mem_limit=w.mem_limit, evict=[w.model_dir, w.offload_dir], env=child_env(),
        )

    return best_batch(one, batches, on_attempt=on_attempt)


def offload_ratio(offloaded: Attempt, in_memory: Attempt) -> float | None:
    """Offloaded decode throughput / in-memory decode throughput at the same block."""
    if not (offloaded.ok and in_memory.ok):
        return None
    base = float(in_memory.result["decode_tokens_per_s"])
    return float(offloaded.result["decode_tokens_per_s"]) / base if base > 0 else None
