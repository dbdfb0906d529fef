"""The sweep's chart: generation throughput against per-block latency (log x), one marker and
colour per system, each system's Pareto frontier drawn as a step line (the best throughput
reachable within a latency: it rises only where a point is). matplotlib is optional (the `plot`
extra) and imported only here."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..files import write_atomic
from .runs import Attempt
from .sweep import pareto_front

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
