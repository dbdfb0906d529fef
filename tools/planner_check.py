"""Issue 11's validation of the planner, on this machine, under a memory cgroup.

    PYTHONPATH=$PWD python tools/planner_check.py --model DIR --offload-dir DIR [--mem-limit 4G]
        [--prompt-len 64] [--gen-len 16] [--num-prompts 128] [--policy 'FLAGS' ...]

Every run is `python -m flexgen_dist.run` on random prompts, in its own memory cgroup of
--mem-limit (the checkpoint and offload files evicted from the page cache first), with no
capacity flags: the planner sees the cgroup's limit as a container's. First the planner's own
choice (`--policy auto`), then each --policy (a hand-written policy: block and --percent flags;
one that does not fit is refused by run and reported). For each: measured and predicted total
throughput, their ratio, measured and predicted peak resident set, their ratio. Then the auto plan
once more in a cgroup of its predicted peak + 10 % (it must not be killed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from flexgen_dist.bench.compare import child_env
from flexgen_dist.bench.memlimit import evict_from_page_cache, run_limited
from flexgen_dist.sizes import format_size, parse_size


def run_one(args, flags: list[str], mem_limit: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "stats.json"
        cmd = [sys.executable, "-m", "flexgen_dist.run", "--model", args.model, "--offload-dir", args.offload_dir,
               "--prompt-len", str(args.prompt_len), "--max-new-tokens", str(args.gen_len),
               "--num-prompts", str(args.num_prompts), "--ignore-eos", "--quiet", "--stats-json", str(stats_path), *flags]
        evict_from_page_cache([Path(args.model), Path(args.offload_dir)])
        child = run_limited(cmd, mem_limit=mem_limit, env=child_env())
        if not child.ok:
            return {"flags": flags, "error": child.describe_failure()}
        stats = json.loads(stats_path.read_text())
    planned = stats["planned"]
    p = stats["policy"]
    pinned = ["--gpu-batch-size", str(p["gpu_batch_size"]), "--num-gpu-batches", str(p["num_gpu_batches"]), "--percent",
              *(f"{p[f'{kind}_{tier}_percent']:g}" for kind in ("w", "cache", "act") for tier in ("gpu", "cpu"))]
    pinned += ["--cpu-cache-compute"] if p["cpu_cache_compute"] else []
    return {
        "policy_flags": pinned,
        "planned_bytes": planned["bytes_per_tier"],
        "flags": flags,
        "policy": f"{p['gpu_batch_size']}x{p['num_gpu_batches']} w {p['w_gpu_percent']:g}/{p['w_cpu_percent']:g} "
                  f"cache {p['cache_gpu_percent']:g}/{p['cache_cpu_percent']:g} act {p['act_gpu_percent']:g}/"
                  f"{p['act_cpu_percent']:g}" + (" cpu-attn" if p["cpu_cache_compute"] else ""),
        "measured_tok_s": stats["tokens_per_s"],
        "predicted_tok_s": planned["tokens_per_s"],
        "measured_prefill_s": stats["prefill_s"], "predicted_prefill_s": planned["prefill_s"],
        "measured_decode_s": stats["decode_s"], "predicted_decode_s": planned["decode_s"],
        "peak_rss": stats["peak_rss"], "predicted_peak_rss": planned["peak_rss"],
        "peak_cgroup": child.peak_cgroup_bytes,
    }


def row(name: str, r: dict) -> str:
    if "error" in r:
        return f"| {name} | {' '.join(r['flags'])} | refused or failed: {r['error'][:160]} | | | | |"
    return (f"| {name} | {r['policy']} | {r['measured_tok_s']:.2f} | {r['predicted_tok_s']:.2f} | "
            f"{r['measured_tok_s'] / r['predicted_tok_s']:.2f} | {format_size(r['peak_rss'])} / "
            f"{format_size(r['predicted_peak_rss'])} = {r['peak_rss'] / r['predicted_peak_rss']:.3f} | "
            f"prefill {r['measured_prefill_s']:.1f}/{r['predicted_prefill_s']:.1f} s, "
            f"decode {r['measured_decode_s']:.1f}/{r['predicted_decode_s']:.1f} s |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--offload-dir", required=True)
    parser.add_argument("--mem-limit", default="4G")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--policy", action="append", default=[], help="a hand-written policy's flags, quoted")
    parser.add_argument("--no-tight", action="store_true", help="skip the run at the predicted peak + 10 %%")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    limit = parse_size(args.mem_limit)
    results = {"auto": run_one(args, ["--policy", "auto"], limit)}
    print(row("auto", results["auto"]), flush=True)
    for i, flags in enumerate(args.policy, 1):
        results[f"hand {i}"] = run_one(args, shlex.split(flags), limit)
        print(row(f"hand {i}", results[f"hand {i}"]), flush=True)
    auto = results["auto"]
    if not args.no_tight and "error" not in auto:
        # The auto run's policy, given by hand, in a cgroup of its predicted peak + 10 %.
        tight = int(auto["predicted_peak_rss"] * 1.1)
        # Its tiers' planned bytes as the capacities: the check passes exactly, whatever the
        # smaller group's detected headroom (less its page-cache reserve) would say.
        sizes = auto["planned_bytes"]
        results["tight"] = run_one(args, auto["policy_flags"] + ["--gpu-mem", str(sizes["gpu"]), "--cpu-mem",
                                                                 str(sizes["cpu"])], tight)
        print(row(f"auto in {format_size(tight)}", results["tight"]), flush=True)
    print("| run | policy | measured tok/s | predicted tok/s | measured / predicted | peak RSS measured / predicted | times measured / predicted |")
    for name, r in results.items():
        print(row(name, r))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
