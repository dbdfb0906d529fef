"""What the bench prints: a line per attempt as it finishes, and the tables at the end (the
pipeline scaling's too)."""

from __future__ import annotations

from ..sizes import format_size
from .runs import Attempt, ScalingRun, best_of


ABOVE_BOUND = 1.05  # a measured rate this far over its bound says the bound is off, not the run
ABOVE_NOTE = ("ABOVE the bound: the profile underrates this machine (re-measure: python -m flexgen_dist.profile) "
              "or disk reads hit the page cache")


def _pct(value: float) -> str:
    return f"{value:.0f}"


def policy_text_from_stats(p: dict) -> str:
    """A policy from a stats JSON, for people: block, then gpu/cpu/disk percentages of weights,
    cache and activations, then the switches that are on."""
    parts = [f"{p['gpu_batch_size']}x{p['num_gpu_batches']}"]
    for kind, name in (("w", "w"), ("cache", "cache"), ("act", "act")):
        gpu, cpu = p[f"{kind}_gpu_percent"], p[f"{kind}_cpu_percent"]
        parts.append(f"{name} {_pct(gpu)}/{_pct(cpu)}/{_pct(max(0.0, 100 - gpu - cpu))}")
    text = ", ".join(parts) + " % gpu/cpu/disk"
    flags = [name for name, on in (("4-bit weights", p.get("compress_weight")), ("4-bit cache", p.get("compress_cache")),
                                   ("cpu attention", p.get("cpu_cache_compute")), ("no overlap", not p.get("overlap", True)))
             if on]
    return text + ("; " + ", ".join(flags) if flags else "")


def policy_text(a: Attempt) -> str:
    r = a.result or {}
    if a.system.startswith("ours"):
        return r.get("policy", "")
    if a.system == "accelerate":
        return r.get("notes") or "decoder layers " + ", ".join(f"{n} on {t}" for t, n in r.get("layers_by_tier", {}).items())
    return "everything in memory"


def bound_text(a: Attempt) -> str:
    """'decode bound 80.1 tok/s (load) = 0.71 of the bound' (or why there is none)."""
    if a.bound is None:
        return f"no bound: {a.bound_error}" if a.bound_error else ""
    if a.bound.decode_tokens_per_s is None:
        return "no decode bound (one new token)"
    text = (f"decode bound {a.bound.decode_tokens_per_s:.2f} tok/s ({a.bound.limiter}-bound) "
            f"= {a.fraction_of_bound:.3g} of the bound")
    if a.fraction_of_bound > ABOVE_BOUND:
        text += f" ({ABOVE_NOTE})"
    return text


def format_attempt(a: Attempt) -> str:
    """One line per attempt, printed as soon as it finishes: 'ours bfloat16 32x4: prefill ...'."""
    what = " ".join(part for part in (a.system, a.dtype, a.label or str(a.batch)) if part)
    if not a.ok:
        return f"{what}: failed: {a.error}"
    r = a.result
    line = (f"{what}: prefill {r['prefill_tokens_per_s']:.2f}, decode {r['decode_tokens_per_s']:.2f}, "
            f"total {r['total_tokens_per_s']:.2f} tok/s")
    bound = bound_text(a)
    if bound:
        line += f"; {bound}"
    if a.peak_bytes:
        line += f"; peak {format_size(a.peak_bytes)}"
    return line + f"; {policy_text(a)}"


def _num(value: float | None, width: int, fmt: str = ".2f") -> str:
    """`value` right-aligned in `width`, or '-' without one."""
    return f"{value:>{width}{fmt}}" if value is not None else f"{'-':>{width}}"


def format_table(model: str, best: dict[str, Attempt | None], attempts: dict[str, list[Attempt]]) -> str:
    """For each system, its best attempt in each compute dtype it ran, '*' marking the system's best;
    ours / it is our best total throughput over the row's; our runs are held against their bound."""
    ours = best.get("ours")
    base = ours.tokens_per_s if ours is not None else 0.0
    header = (f"  {'system':<15} {'dtype':<9} {'model':<10} {'eff. batch':>10} {'prefill tok/s':>13} "
              f"{'decode tok/s':>12} {'decode bound':>12} {'of bound':>8} {'total tok/s':>11} {'peak mem':>10} "
              f"{'ours / it':>9}  policy")
    lines = [header]
    for system, system_best in best.items():
        tried = attempts.get(system, [])
        if system_best is None:
            why = tried[-1].error if tried else "not run"
            dtypes = ",".join(dict.fromkeys(a.dtype for a in tried if a.dtype)) or "-"
            lines.append(f"  {system:<15} {dtypes:<9} {model:<10} {'-':>10} {'-':>13} {'-':>12} {'-':>12} {'-':>8} "
                         f"{'-':>11} {'-':>10} {'-':>9}  failed: {why}")
            continue
        per_dtype = {}
        for a in tried:
            if a.ok and a.tokens_per_s >= per_dtype.get(a.dtype, a).tokens_per_s:
                per_dtype[a.dtype] = a
        per_dtype.setdefault(system_best.dtype, system_best)
        for a in sorted(per_dtype.values(), key=lambda a: -a.tokens_per_s):
            r = a.result
            decode_bound = a.bound.decode_tokens_per_s if a.bound is not None else None
            ratio = base / a.tokens_per_s if a.tokens_per_s else float("nan")
            mark = "*" if a is system_best else " "
            lines.append(
                f"{mark} {system:<15} {a.dtype or '?':<9} {model:<10} {a.batch:>10} {r['prefill_tokens_per_s']:>13.2f} "
                f"{r['decode_tokens_per_s']:>12.2f} {_num(decode_bound, 12)} {_num(a.fraction_of_bound, 8, '.3g')} "
                f"{r['total_tokens_per_s']:>11.2f} {format_size(a.peak_bytes) if a.peak_bytes else '?':>10} "
                f"{ratio:>8.2f}x  {policy_text(a)}"
            )
    return "\n".join(lines)


def _run_name(a: Attempt) -> str:
    """'bfloat16, batch 16' / 'float32, block 32x4'."""
    what = f"block {a.label}" if a.system.startswith("ours") and a.label else f"batch {a.batch}"
    return f"{a.dtype or '?'}, {what}"


def format_summary(attempts: dict[str, list[Attempt]], *, prompt_len: int, gen_len: int, cap: str) -> str:
    """The README's benchmark table: each system's best run (by total throughput) with its dtype and
    block, its prefill, decode and total tokens/s; then ours over each other system's best, in
    decode and in total, each system at its best run for that measure (over all its dtypes and
    batches). Markdown, so it pastes into the README."""
    lines = [f"summary: prompt {prompt_len}, {gen_len} new tokens, memory cap {cap}", "",
             "| system | dtype, block | prefill | decode | total tok/s |", "| --- | --- | --- | --- | --- |"]
    for system, tried in attempts.items():
        a = best_of(tried)
        if a is None:
            why = tried[-1].error if tried else "not run"
            lines.append(f"| {system} | failed: {why} | | | |")
            continue
        r = a.result
        lines.append(f"| {system} | {_run_name(a)} | {r['prefill_tokens_per_s']:.2f} | {r['decode_tokens_per_s']:.2f} "
                     f"| {r['total_tokens_per_s']:.2f} |")
    lines.append("")
    ours = attempts.get("ours", [])
    for system, tried in attempts.items():
        if system.startswith("ours"):
            continue
        parts = []
        for measure, key in (("decode", "decode_tokens_per_s"), ("total", "total_tokens_per_s")):
            mine, theirs = best_of(ours, key), best_of(tried, key)
            if mine is None or theirs is None or float(theirs.result[key]) <= 0:
                parts.append(f"{measure} not measured ({'ours' if mine is None else system} has no successful run)")
                continue
            parts.append(f"{measure} {float(mine.result[key]) / float(theirs.result[key]):.2f}x "
                         f"({float(mine.result[key]):.2f} at {_run_name(mine)} / {float(theirs.result[key]):.2f} "
                         f"at {_run_name(theirs)})")
        lines.append(f"ours / {system}-best: " + "; ".join(parts))
    return "\n".join(lines)


def format_sweep_table(rows: list[Attempt], frontier: set[int]) -> str:
    """Every run of a sweep, '*' marking the points on their system's Pareto frontier."""
    header = (f"  {'system':<13} {'dtype':<9} {'run':<16} {'latency s':>9} {'total tok/s':>11} {'decode tok/s':>12} "
              f"{'decode bound':>12} {'of bound':>8} {'peak mem':>10}  policy")
    lines = [header]
    for idx, a in enumerate(rows):
        mark = "*" if idx in frontier else " "
        if not a.ok:
            lines.append(f"{mark} {a.system:<13} {a.dtype or '-':<9} {a.label:<16} failed: {a.error}")
            continue
        decode_bound = a.bound.decode_tokens_per_s if a.bound is not None else None
        lines.append(
            f"{mark} {a.system:<13} {a.dtype or '?':<9} {a.label:<16} {a.block_latency_s:>9.3f} {a.tokens_per_s:>11.2f} "
            f"{a.result['decode_tokens_per_s']:>12.2f} {_num(decode_bound, 12)} {_num(a.fraction_of_bound, 8, '.3g')} "
            f"{format_size(a.peak_bytes) if a.peak_bytes else '?':>10}  {policy_text(a)}"
        )
    return "\n".join(lines)


def format_scaling_table(runs: list[ScalingRun]) -> str:
    """The pipeline scaling runs, one line per rank count, against the first."""
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
