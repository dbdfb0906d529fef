"""Ours against transformers and Accelerate on the same model, workload and memory cap.

Every system runs as its own child process (ours: `python -m flexgen_dist.run`; the baselines:
`python -m flexgen_dist.bench.baselines`), under the same cgroup memory cap when one is given,
with the checkpoint and offload files evicted from the page cache first, so disk offloading is
measured against the disk and not against RAM. Each system is tried at increasing batches until
one no longer fits; its best is reported.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..planning.sizes import format_size
from .runs import Attempt, best_batch, run_baseline
from .memlimit import evict_from_page_cache, run_limited


@dataclass(frozen=True)
class Workload:
    model_dir: Path
    prompt_len: int
    gen_len: int
    mem_limit: int | None  # cgroup cap for every system (None: none)
    budget: int | None  # bytes each system may place in RAM (Accelerate's max_memory; our tiers)
    offload_dir: Path
    seed: int = 0


def child_env() -> dict:
    """The same environment for every system. glibc's dynamic mmap threshold lets the heap of a
    process that allocates and frees layer-sized buffers fragment until a capped run is OOM-killed
    (seen with Accelerate at batch 32 under 4 GiB: 5 GiB of heap for 2 GiB of live data); a fixed
    4 MiB threshold returns such buffers to the system. Applied to all systems alike."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "4194304"}


def ours_command(w: Workload, gpu_batch_size: int, num_gpu_batches: int, stats_path: Path) -> list[str]:
    cmd = [
        sys.executable, "-m", "flexgen_dist.run", "--model", str(w.model_dir),
        "--prompt-len", str(w.prompt_len), "--gen-len", str(w.gen_len), "--seed", str(w.seed),
        "--num-prompts", str(gpu_batch_size * num_gpu_batches), "--gpu-batch-size", str(gpu_batch_size),
        "--num-gpu-batches", str(num_gpu_batches), "--ignore-eos", "--stats-json", str(stats_path),
        "--offload-dir", str(w.offload_dir / "ours"),
    ]
    if w.budget is not None:
        # On a machine without a GPU both tiers are RAM: half the budget each (the gpu tier holds
        # fp32 copies ready to compute, the cpu tier 16-bit copies); the rest goes to disk.
        cmd += ["--gpu-mem", str(w.budget // 2), "--cpu-mem", str(w.budget // 2)]
    return cmd


def run_ours(w: Workload, gpu_batch_size: int, num_gpu_batches: int) -> Attempt:
    batch = gpu_batch_size * num_gpu_batches
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "stats.json"
        cmd = ours_command(w, gpu_batch_size, num_gpu_batches, stats_path)
        evict_from_page_cache([w.model_dir, w.offload_dir])
        run = run_limited(cmd, mem_limit=w.mem_limit, env=child_env())
        attempt = Attempt(system="ours", batch=batch, ok=False, oom_killed=run.oom_killed,
                          peak_rss_bytes=run.peak_rss_bytes, peak_cgroup_bytes=run.peak_cgroup_bytes,
                          limit_method=run.limit_method, command=cmd, stderr_tail=run.stderr[-4000:])
        if not run.ok:
            attempt.error = run.describe_failure()
            return attempt
        stats = json.loads(stats_path.read_text())
    p = stats["policy"]
    attempt.ok = True
    attempt.result = {
        "system": "ours",
        "batch": batch,
        "policy": (f"{gpu_batch_size}x{num_gpu_batches}, w {p['w_gpu_percent']:.0f}/{p['w_cpu_percent']:.0f}, "
                   f"cache {p['cache_gpu_percent']:.0f}/{p['cache_cpu_percent']:.0f} % gpu/cpu"),
        "prefill_tokens_per_s": stats["prefill_tokens_per_s"],
        "decode_tokens_per_s": stats["decode_tokens_per_s"],
        "total_tokens_per_s": stats["tokens_per_s"],
        "prefill_s": stats["prefill_s"],
        "decode_s": stats["decode_s"],
    }
    return attempt


def best_ours(w: Workload, blocks: list[tuple[int, int]]) -> tuple[Attempt | None, list[Attempt]]:
    """Blocks (gpu batch size, gpu batches) tried in order of size while they fit."""
    by_size = {gbs * ngb: (gbs, ngb) for gbs, ngb in blocks}
    return best_batch(lambda size: run_ours(w, *by_size[size]), by_size)


def best_baseline(system: str, w: Workload, batches: list[int]) -> tuple[Attempt | None, list[Attempt]]:
    def one(batch: int) -> Attempt:
        return run_baseline(
            system, w.model_dir, batch, w.prompt_len, w.gen_len,
            max_memory=w.budget if system == "accelerate" else None,
            offload_folder=w.offload_dir / "accelerate" if system == "accelerate" else None,
            seed=w.seed, mem_limit=w.mem_limit, evict=[w.model_dir, w.offload_dir], env=child_env(),
        )

    return best_batch(one, batches)


def policy_text(a: Attempt) -> str:
    r = a.result or {}
    if a.system == "ours":
        return r.get("policy", "")
    if a.system == "accelerate":
        return r.get("notes") or "decoder layers " + ", ".join(f"{n} on {t}" for t, n in r.get("layers_by_tier", {}).items())
    return "everything in memory"


def format_table(model: str, best: dict[str, Attempt | None], attempts: dict[str, list[Attempt]]) -> str:
    ours = best.get("ours")
    base = ours.tokens_per_s if ours is not None else 0.0
    header = (f"{'system':<13} {'model':<10} {'eff. batch':>10} {'prefill tok/s':>13} {'decode tok/s':>12} "
              f"{'total tok/s':>11} {'peak mem':>10} {'ours / it':>9}  policy")
    lines = [header]
    for system, a in best.items():
        if a is None:
            why = attempts[system][-1].error if attempts[system] else "not run"
            lines.append(f"{system:<13} {model:<10} {'-':>10} {'-':>13} {'-':>12} {'-':>11} {'-':>10} {'-':>9}  failed: {why}")
            continue
        r = a.result
        peak = a.peak_rss_bytes or a.peak_cgroup_bytes  # under a cap the cgroup's peak is the cap: page cache fills it
        ratio = base / a.tokens_per_s if a.tokens_per_s else float("nan")
        lines.append(
            f"{system:<13} {model:<10} {a.batch:>10} {r['prefill_tokens_per_s']:>13.2f} {r['decode_tokens_per_s']:>12.2f} "
            f"{r['total_tokens_per_s']:>11.2f} {format_size(peak) if peak else '?':>10} {ratio:>8.2f}x  {policy_text(a)}"
        )
    return "\n".join(lines)
