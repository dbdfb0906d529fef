"""Throughput against latency: a grid of our policies and the baselines at several batches, each
run as the compare mode runs it, written as a CSV and plotted (`plot_sweep`) with each system's
Pareto frontier, as the FlexGen paper's Figure 1 shows it.

A point's latency is the time to generate one block's tokens, prefill to last token: every run is
one block (ours: `--num-prompts` = the block size; a baseline: one `generate` call of its batch),
so it is the run's prefill_s + decode_s. Its throughput is the run's generated tokens / that time.

The planner's points (`--policy auto --max-latency L` of `flexgen_dist.run`, one per latency
bound) join the grid through `planner_points` once run.py has those flags.

The chart: generation throughput against per-block latency (log x), one marker and colour per
system, each system's Pareto frontier drawn as a step line (the best throughput reachable within a
latency: it rises only where a point is). matplotlib is optional (the `plot` extra) and imported
only in `plot_sweep`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import NotSupportedYet, UserError
from ..files import write_atomic
from .bound import BoundModels
from .compare import OursRun, Workload, best_baseline, run_ours
from .report import policy_text
from .runs import Attempt

# Named placements: --percent's six numbers (weights, KV cache, activations on gpu and cpu; the
# disk takes the rest). On a machine without a GPU the gpu tier is host RAM in the compute dtype,
# the cpu tier host RAM in the checkpoint's dtype (converted layer by layer as it is used).
PLACEMENTS: dict[str, tuple[float, ...]] = {
    "gpu": (100, 0, 100, 0, 100, 0),  # everything on the compute device
    "cpu": (0, 100, 100, 0, 100, 0),  # weights in host memory, cache on the compute device
    "mixed": (0, 50, 100, 0, 100, 0),  # half of each layer's weights in host memory, half on disk
    "disk": (0, 0, 100, 0, 100, 0),  # weights on disk
}

CSV_COLUMNS = (
    "system", "dtype", "run", "batch", "policy", "prefill_tokens_per_s", "decode_tokens_per_s", "total_tokens_per_s",
    "block_latency_s", "peak_mem_bytes", "decode_bound_tokens_per_s", "of_bound", "error",
)


@dataclass(frozen=True)
class NamedPlacement:
    name: str  # a key of PLACEMENTS, or the numbers as given
    percent: tuple[float, ...]  # six numbers, as --percent takes them


def parse_placements(text: str) -> list[NamedPlacement]:
    """--placements: comma-separated names (gpu, cpu, mixed, disk) or six numbers joined by '/',
    e.g. gpu,disk,20/30/100/0/100/0."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item in PLACEMENTS:
            out.append(NamedPlacement(item, PLACEMENTS[item]))
            continue
        try:
            numbers = tuple(float(x) for x in item.split("/"))
        except ValueError:
            numbers = ()
        if len(numbers) != 6 or any(not 0 <= x <= 100 for x in numbers) or any(
                numbers[i] + numbers[i + 1] > 100 for i in (0, 2, 4)):
            raise UserError(f"--placements: {item!r} is neither one of {', '.join(PLACEMENTS)} nor six percentages "
                            "W_GPU/W_CPU/CACHE_GPU/CACHE_CPU/ACT_GPU/ACT_CPU (each pair <= 100), e.g. 20/30/100/0/100/0")
        out.append(NamedPlacement(item, numbers))
    if not out:
        raise UserError("--placements lists no placement; e.g. gpu,cpu,disk")
    return out


def grid_runs(blocks: Sequence[tuple[int, int]], placements: Sequence[NamedPlacement],
              dtypes: Sequence[str | None] = (None,)) -> list[list[OursRun]]:
    """Our runs, one list per compute dtype and placement with its blocks smallest first (a larger
    block is not tried once a smaller one failed: it needs more memory still). Fixed placements:
    no budget fit. A dtype None leaves run's --compute-dtype at its default."""
    groups = []
    for dtype in dtypes:
        for placement in placements:
            percent = tuple(f"{x:g}" for x in placement.percent)
            groups.append([OursRun(block=block, percent=percent, use_budget=False, compute_dtype=dtype,
                                   label=f"{block[0]}x{block[1]} {placement.name}")
                           for block in sorted(blocks, key=lambda b: (b[0] * b[1], b))])
    return groups


def planner_points(max_latencies: Sequence[float], run_flags: set[str]) -> list[OursRun]:
    """The hook for the planner: one run per latency bound, with the child choosing its policy
    (`--policy auto --max-latency L`) and its block (one block of prompts: no --num-prompts).
    `run_flags`: the option strings `python -m flexgen_dist.run` accepts."""
    if not max_latencies:
        return []
    if not {"--policy", "--max-latency"} <= run_flags:
        raise NotSupportedYet("--max-latencies: python -m flexgen_dist.run has no --policy auto --max-latency yet; "
                              "drop --max-latencies until the planner is wired into the CLI")
    return [OursRun(block=None, use_budget=True, label=f"auto <= {seconds:g} s",
                    extra_args=("--policy", "auto", "--max-latency", f"{seconds:g}")) for seconds in max_latencies]


def run_flags() -> set[str]:
    """Option strings of `python -m flexgen_dist.run`, read from its parser (for `planner_points`)."""
    from ..run import build_parser

    return {opt for action in build_parser()._actions for opt in action.option_strings}


def run_sweep(w: Workload, groups: list[list[OursRun]], planner: list[OursRun], systems: Sequence[str],
              batches: Sequence[int], bounds: BoundModels | None, *, dtypes: Mapping[str, Sequence[str | None]] = {},
              on_attempt: Callable[[Attempt], None]) -> list[Attempt]:
    """Every run of the sweep, in the order run: ours (grid, then the planner's points), then each
    baseline in each of its `dtypes` (none given: its default) at its batches while they fit."""
    rows: list[Attempt] = []

    def record(attempt: Attempt) -> None:
        rows.append(attempt)
        on_attempt(attempt)

    if "ours" in systems:
        for group in groups:
            for run in group:
                attempt = run_ours(w, run, bounds)
                record(attempt)
                if not attempt.ok:
                    break
        for run in planner:
            record(run_ours(w, run, bounds))
    for system in systems:
        if system != "ours":
            for dtype in dtypes.get(system) or [None]:
                best_baseline(system, w, list(batches), dtype=dtype, on_attempt=record)
    return rows


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, throughput) points that no other point beats: none has a lower or
    equal latency with a higher throughput (nor the same throughput at a lower latency). Sorted by
    latency; throughput rises along them."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for idx in order:
        if points[idx][1] > best:
            front.append(idx)
            best = points[idx][1]
    return front


def frontier_by_system(rows: Sequence[Attempt]) -> set[int]:
    """Indices into `rows` of the successful runs on their own system's frontier."""
    out: set[int] = set()
    for system in dict.fromkeys(a.system for a in rows):
        idx = [i for i, a in enumerate(rows) if a.system == system and a.ok]
        front = pareto_front([(rows[i].block_latency_s, rows[i].tokens_per_s) for i in idx])
        out.update(idx[j] for j in front)
    return out


def csv_row(a: Attempt) -> dict:
    r = a.result or {}
    return {
        "system": a.system,
        "dtype": a.dtype,
        "run": a.label,
        "batch": a.batch,
        "policy": policy_text(a) if a.ok else "",
        "prefill_tokens_per_s": r.get("prefill_tokens_per_s", ""),
        "decode_tokens_per_s": r.get("decode_tokens_per_s", ""),
        "total_tokens_per_s": r.get("total_tokens_per_s", ""),
        "block_latency_s": a.block_latency_s if a.ok else "",
        "peak_mem_bytes": a.peak_bytes or "",
        "decode_bound_tokens_per_s": a.bound.decode_tokens_per_s if a.bound and a.bound.decode_tokens_per_s else "",
        "of_bound": a.fraction_of_bound if a.fraction_of_bound is not None else "",
        "error": a.error,
    }


def write_csv(rows: Sequence[Attempt], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for a in rows:
        writer.writerow(csv_row(a))
    write_atomic(path, text.getvalue().encode())


# --- the chart ------------------------------------------------------------------------------------

MARKERS = {"ours": "o", "transformers": "s", "accelerate": "^"}
MISSING = "--sweep-png needs matplotlib: pip install 'flexgen_dist[plot]'"


def require_matplotlib() -> None:
    """Fail before a long sweep, not after it, when the chart cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(MISSING) from None


def plot_sweep(rows: Sequence[Attempt], path: str | Path, *, title: str) -> None:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for system in dict.fromkeys(a.system for a in rows):
        done = [a for a in rows if a.system == system and a.ok and a.block_latency_s]
        if not done:
            continue
        points = [(a.block_latency_s, a.tokens_per_s) for a in done]
        dots = ax.scatter([x for x, _ in points], [y for _, y in points], marker=MARKERS.get(system, "D"),
                          label=system, zorder=3)
        front = [points[i] for i in pareto_front(points)]
        ax.plot([x for x, _ in front], [y for _, y in front], drawstyle="steps-post", color=dots.get_facecolor()[0],
                alpha=0.8, zorder=2)
        for a, (x, y) in zip(done, points):
            ax.annotate(f"{a.label} {a.dtype}".strip(), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("latency of one block, prefill to last token (s, log scale)")
    ax.set_ylabel("generation throughput (generated tokens/s)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="system (line: Pareto frontier)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    write_atomic(path, image.getvalue())
