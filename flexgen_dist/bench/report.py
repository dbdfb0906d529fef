"""What the bench prints: a line per attempt as it finishes, and the tables at the end."""

from __future__ import annotations

from ..planning.sizes import format_size
from .runs import Attempt


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
    """One line per attempt, printed as soon as it finishes."""
    what = f"{a.system} {a.label or a.batch}"
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
    """The best attempt of each system, with ours / it and our runs against their bound."""
    ours = best.get("ours")
    base = ours.tokens_per_s if ours is not None else 0.0
    header = (f"{'system':<15} {'model':<10} {'eff. batch':>10} {'prefill tok/s':>13} {'decode tok/s':>12} "
              f"{'decode bound':>12} {'of bound':>8} {'total tok/s':>11} {'peak mem':>10} {'ours / it':>9}  policy")
    lines = [header]
    for system, a in best.items():
        if a is None:
            why = attempts[system][-1].error if attempts.get(system) else "not run"
            lines.append(f"{system:<15} {model:<10} {'-':>10} {'-':>13} {'-':>12} {'-':>12} {'-':>8} {'-':>11} "
                         f"{'-':>10} {'-':>9}  failed: {why}")
            continue
        r = a.result
        decode_bound = a.bound.decode_tokens_per_s if a.bound is not None else None
        ratio = base / a.tokens_per_s if a.tokens_per_s else float("nan")
        lines.append(
            f"{system:<15} {model:<10} {a.batch:>10} {r['prefill_tokens_per_s']:>13.2f} {r['decode_tokens_per_s']:>12.2f} "
            f"{_num(decode_bound, 12)} {_num(a.fraction_of_bound, 8, '.3g')} {r['total_tokens_per_s']:>11.2f} "
            f"{format_size(a.peak_bytes) if a.peak_bytes else '?':>10} {ratio:>8.2f}x  {policy_text(a)}"
        )
    return "\n".join(lines)


def format_sweep_table(rows: list[Attempt], frontier: set[int]) -> str:
    """Every run of a sweep, '*' marking the points on their system's Pareto frontier."""
    header = (f"  {'system':<13} {'run':<16} {'latency s':>9} {'total tok/s':>11} {'decode tok/s':>12} "
              f"{'decode bound':>12} {'of bound':>8} {'peak mem':>10}  policy")
    lines = [header]
    for idx, a in enumerate(rows):
        mark = "*" if idx in frontier else " "
        if not a.ok:
            lines.append(f"{mark} {a.system:<13} {a.label:<16} failed: {a.error}")
            continue
        decode_bound = a.bound.decode_tokens_per_s if a.bound is not None else None
        lines.append(
            f"{mark} {a.system:<13} {a.label:<16} {a.block_latency_s:>9.3f} {a.tokens_per_s:>11.2f} "
            f"{a.result['decode_tokens_per_s']:>12.2f} {_num(decode_bound, 12)} {_num(a.fraction_of_bound, 8, '.3g')} "
            f"{format_size(a.peak_bytes) if a.peak_bytes else '?':>10}  {policy_text(a)}"
        )
    return "\n".join(lines)
