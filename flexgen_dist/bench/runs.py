"""The bench's children, as the parent sees them: a baseline's run (one child, optionally under a
memory cap, its JSON line parsed: `run_baseline`) and its batches tried while they fit
(`best_batch`); and ours under 1, 2, ... pipeline ranks (`run_ranks`).

Pipeline scaling, decode throughput per rank count: each rank count runs as its own launch
(`python -m flexgen_dist.run` for one rank, `torchrun --standalone` for more) with the same
prompts, the same per-rank memory capacities and the same total thread budget (cores / ranks
threads each), so what changes is how many layers each rank holds and therefore how much of them
fits in fast memory.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from flexgen_dist.bench.baselines import SYSTEMS
from flexgen_dist.bench.bound import Bound
from flexgen_dist.bench.memlimit import LimitedRun, evict_from_page_cache, run_limited
from flexgen_dist.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    """One baseline run at one batch, as the parent saw it."""

    system: str
    batch: int
    ok: bool
    result: dict | None = None
    """The child's JSON record (None when it failed)."""
    error: str = ""
    """Why it failed: 'out of memory under the 4.00 GiB cap (...)', 'exit code 1: ...', ..."""
    oom_killed: bool = False
    peak_rss_bytes: int | None = None
    peak_cgroup_bytes: int | None = None
    limit_method: str = "none"
    command: list[str] = field(default_factory=list)
    stderr_tail: str = ""
    label: str = ""
    """What was run, for people: our block ("8x1", "8x1 disk") or a baseline's batch ("8")."""
    dtype: str = ""
    """The compute dtype it ran in (what the child reports; as asked when it failed)."""
    bound: Bound | None = None
    """Ours: the cost model's bound for the policy the run used (see bound.py)."""
    bound_error: str = ""
    """Ours: why there is no bound, when there is none."""

    @property
    def tokens_per_s(self) -> float:
        return float(self.result["total_tokens_per_s"]) if self.ok and self.result else 0.0

    @property
    def peak_bytes(self) -> int | None:
        """The child's own peak RSS; the cgroup's peak only without it (under a cap the cgroup's
        peak is about the cap: the page cache fills it)."""
        return self.peak_rss_bytes or self.peak_cgroup_bytes

    @property
    def block_latency_s(self) -> float | None:
        """Seconds from a block's prefill to its last token: every run here is one block (ours:
        as many prompts as the block holds; a baseline: one `generate` call of the batch)."""
        if not self.ok or not self.result:
            return None
        return float(self.result["prefill_s"]) + float(self.result["decode_s"])

    @property
    def fraction_of_bound(self) -> float | None:
        if not self.ok or self.bound is None or not self.result:
            return None
        return self.bound.fraction(float(self.result["decode_tokens_per_s"]))

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "bound"}
        data["bound"] = self.bound.to_dict() if self.bound is not None else None
        data["fraction_of_bound"] = self.fraction_of_bound
        data["block_latency_s"] = self.block_latency_s
        return data


def baseline_command(
    system: str,
    model_dir,
    batch: int,
    prompt_len: int,
    gen_len: int,
    *,
    max_memory: str | int | None = None,
    offload_folder=None,
    dtype: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    prefill_timing: str = "first-forward",
    python: str = sys.executable,
) -> list[str]:
    """The argv of one baseline child (see the module docstring)."""
    if system not in SYSTEMS:
        raise UserError(f"unknown baseline system {system!r}; use one of {', '.join(SYSTEMS)}")
    cmd = [python, "-m", "flexgen_dist.bench.baselines", "--system", system, "--model", str(model_dir),
           "--batch", str(batch), "--prompt-len", str(prompt_len), "--gen-len", str(gen_len), "--seed", str(seed),
           "--prefill-timing", prefill_timing]
    if max_memory is not None:
        cmd += ["--max-memory", str(max_memory)]
    if offload_folder is not None:
        cmd += ["--offload-folder", str(offload_folder)]
    if dtype is not None:
        cmd += ["--dtype", dtype]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def run_baseline(
    system: str,
    model_dir,
    batch: int,
    prompt_len: int,
    gen_len: int,
    *,
    mem_limit: int | None = None,
    evict: Iterable = (),
    timeout_s: float | None = None,
    env: dict | None = None,
    **child_options,
) -> Attempt:
    """Run one baseline child, under `mem_limit` bytes when given (`memlimit.run_limited`),
    after evicting the files under `evict` (typically the checkpoint and the offload folder)
    from the page cache, and parse its JSON line. `child_options` are `baseline_command`'s
    (max_memory, offload_folder, dtype, seed, threads, prefill_timing)."""
    cmd = baseline_command(system, model_dir, batch, prompt_len, gen_len, **child_options)
    evict = [evict] if isinstance(evict, (str, os.PathLike)) else list(evict)
    if evict:
        evict_from_page_cache(evict)
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    run: LimitedRun = run_limited(cmd, mem_limit=mem_limit, env=child_env, timeout_s=timeout_s)
    attempt = Attempt(system=system, batch=batch, ok=False, label=str(batch), oom_killed=run.oom_killed,
                      peak_rss_bytes=run.peak_rss_bytes, peak_cgroup_bytes=run.peak_cgroup_bytes,
                      limit_method=run.limit_method, command=cmd, stderr_tail=run.stderr[-4000:],
                      dtype=child_options.get("dtype") or "")
    if not run.ok:
        attempt.error = run.describe_failure()
        return attempt
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
    try:
        attempt.result = json.loads(lines[-1])
    except (IndexError, ValueError):
        attempt.error = f"no JSON line on the child's stdout: {run.stdout[-300:]!r}"
        return attempt
    attempt.ok = True
    attempt.dtype = attempt.result.get("dtype", attempt.dtype)
    if attempt.peak_rss_bytes is None:
        attempt.peak_rss_bytes = attempt.result.get("peak_rss_bytes")
    return attempt


def best_batch(run_fn: Callable[[int], Attempt], batches: Iterable[int], *,
               on_attempt: Callable[[Attempt], None] | None = None) -> tuple[Attempt | None, list[Attempt]]:
    """Try `run_fn(batch)` for the batches in increasing order until one fails (out of memory
    under the cap, an error, or `run_fn` raising); return the attempt with the highest total
    throughput (None when none succeeded) and every attempt made, in order. A larger batch is
    not tried after a failure: it would need more memory still. `on_attempt` sees each attempt
    as soon as it is over (the bench prints it: a long run shows its progress)."""
    attempts: list[Attempt] = []
    best = None
    for batch in sorted(set(batches)):
        try:
            attempt = run_fn(batch)
        except Exception as e:  # noqa: BLE001 - a failed run is a result here, not a crash
            attempt = Attempt(system="?", batch=batch, ok=False, label=str(batch), error=f"{type(e).__name__}: {e}")
        attempts.append(attempt)
        if on_attempt is not None:
            on_attempt(attempt)
        if not attempt.ok:
            log.info("batch %d failed: %s", batch, attempt.error)
            break
        if best is None or attempt.tokens_per_s > best.tokens_per_s:
            best = attempt
    return best, attempts


def best_of(attempts: list[Attempt], key: str = "total_tokens_per_s") -> Attempt | None:
    """The successful attempt with the highest `key` of its result (None: none succeeded)."""
    done = [a for a in attempts if a.ok and a.result]
    return max(done, key=lambda a: float(a.result[key])) if done else None


# --- pipeline scaling -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingRun:
    ranks: int
    decode_tokens_per_s: float
    tokens_per_s: float
    policy: dict  # rank 0's (fitted) policy
    seconds: float


def run_ranks(ranks: int, run_args: list[str], *, cores: int, timeout_s: float | None = None) -> ScalingRun:
    threads = max(1, cores // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "stats.json"
        job = ["-m", "flexgen_dist.run", *run_args, "--stats-json", str(stats_path)]
        if ranks == 1:
            cmd = [sys.executable, *job]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *job]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise UserError(f"the {ranks}-rank run failed (exit {proc.returncode}): {tail}")
        stats = json.loads(stats_path.read_text())
    return ScalingRun(
        ranks=ranks,
        decode_tokens_per_s=stats["decode_tokens_per_s"],
        tokens_per_s=stats["tokens_per_s"],
        policy=stats["policy"],
        seconds=stats["total_s"],
    )
