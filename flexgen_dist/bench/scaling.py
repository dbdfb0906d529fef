"""Decode throughput per rank count: the same job under 1, 2, ... pipeline ranks.

Each rank count runs as its own launch (`python -m flexgen_dist.run` for one rank, `torchrun
--standalone` for more) with the same prompts, the same per-rank memory capacities and the same
total thread budget (cores / ranks threads each), so what changes is how many layers each rank
holds and therefore how much of them fits in fast memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


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


def format_table(runs: list[ScalingRun]) -> str:
    base = runs[0]
    lines = [
        f"{'ranks':>5}  {'weights gpu/cpu/disk %':>22}  {'decode tok/s':>12}  {'total tok/s':>11}  {'decode vs ' + str(base.ranks) + ' rank':>16}  {'per rank':>8}",
    ]
    for r in runs:
        p = r.policy
        disk = max(0.0, 100 - p["w_gpu_percent"] - p["w_cpu_percent"])
        tiers = f"{p['w_gpu_percent']:.0f}/{p['w_cpu_percent']:.0f}/{disk:.0f}"
        ratio = r.decode_tokens_per_s / base.decode_tokens_per_s if base.decode_tokens_per_s else float("nan")
        per_rank = ratio * base.ranks / r.ranks
        lines.append(
            f"{r.ranks:>5}  {tiers:>22}  {r.decode_tokens_per_s:>12.2f}  {r.tokens_per_s:>11.2f}  {ratio:>15.2f}x  {per_rank:>7.2f}x"
        )
    return "\n".join(lines)
