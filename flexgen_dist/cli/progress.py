"""What a job on rank 0 tells its user: the start lines (`start_line`: the policy, the block
shape and where the weights live; `settings_line`: how it generates), then its progress: prompts
done, tokens/s and ETA, as blocks finish.

On a terminal it is a tqdm bar on stderr. Without one (a batch job's log file) a bar would fill
the log with carriage returns, so a line is printed every `interval_s` (30 s) instead, from a
timer thread, so that a long block still shows the run is alive. `enabled=False` (--quiet)
prints nothing.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, TextIO

from ..api.generation import RunSettings
from ..planning.placement import Tier
from ..sizes import format_size
from ..spec.checks import NAME as GENERATION_CONFIG

LOG_INTERVAL_S = 30.0


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """total: prompts of the run (this shard); initial: those already finished (resumed)."""

    def __init__(self, *, total: int, initial: int = 0, stream: TextIO, enabled: bool = True,
                 interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.total, self.done, self.stream = total, initial, stream
        self._initial = initial
        self._tokens = 0
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not enabled or total <= initial:
            return
        if _is_terminal(stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="prompt", file=stream, dynamic_ncols=True,
                             desc="generating", smoothing=0.1)
        elif interval_s > 0:
            self._thread = threading.Thread(target=self._every, args=(interval_s,), name="progress", daemon=True)
            self._thread.start()

    def update(self, prompts: int, tokens: int) -> None:
        """A block finished: `prompts` more results, `tokens` more generated tokens."""
        with self._lock:
            self.done += prompts
            self._tokens += tokens
            if self._bar is not None:
                self._bar.set_postfix_str(f"{self.tokens_per_s():.1f} tok/s", refresh=False)
                self._bar.update(prompts)

    def tokens_per_s(self) -> float:
        elapsed = self._clock() - self._started
        return self._tokens / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """`progress: 40/200 prompts (20%), 512.3 tok/s, ETA 3m12s` (ETA from this run's rate)."""
        elapsed = self._clock() - self._started
        done_here = self.done - self._initial
        left = self.total - self.done
        eta = format_duration(left * elapsed / done_here) if done_here > 0 else "unknown"
        share = self.done / self.total if self.total else 1.0
        return (f"progress: {self.done}/{self.total} prompts ({share:.0%}), {self.tokens_per_s():.1f} tok/s, "
                f"ETA {eta}")

    def tick(self) -> None:
        """Print the progress line (the timer thread calls this every interval)."""
        with self._lock:
            print(self.line(), file=self.stream, flush=True)

    def _every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.tick()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def settings_line(settings: RunSettings, eos_ids, eos_source: str) -> str:
    """How the run generates, and which settings the model's generation_config.json gave."""
    if settings.do_sample:
        how = (f"sampling (temperature {settings.temperature:g}, top-k {settings.top_k or 'off'}, "
               f"top-p {settings.top_p:g}, seed {settings.seed})")
    else:
        how = "greedy"
    eos = "ignored (--ignore-eos)" if settings.ignore_eos else (
        f"{', '.join(str(i) for i in eos_ids)} (from {eos_source})" if eos_ids else f"none (from {eos_source})")
    given = (f"; from {GENERATION_CONFIG}: {', '.join(settings.from_model)} (flags override them)"
             if settings.from_model else "")
    return f"generation: {how}; EOS ids {eos}; at most {settings.max_new_tokens} new tokens{given}"


def start_line(llm, world_size: int, offload_dir: str | None) -> str:
    """The policy, the block shape and where the weights live (rank 0's share of them)."""
    p = llm.policy

    def split(kind: str) -> str:
        return "/".join(f"{x:g}" for x in p.percents(kind))

    weights = llm.placement.weight_bytes()
    where = ", ".join(f"{tier} {format_size(n)}" for tier, n in weights.items() if n) or "none"
    if weights.get(Tier.DISK):
        where += f" (disk tier in {offload_dir})"
    units = llm.units
    stage = (f"; rank 0 of {world_size} holds schedule layers {units[0].layer_idx}..{units[-1].layer_idx}"
             if world_size > 1 else "")
    how = "chosen by the planner" if llm.plan.searched else "as given"
    return (f"policy: blocks of {p.block_size} prompts ({p.gpu_batch_size} x {p.num_gpu_batches} gpu batches); "
            f"gpu/cpu/disk %: weights {split('w')}, KV cache {split('cache')}, activations {split('act')}; "
            f"weights: {where}; compute on {llm.device} in {llm.placement.dtypes.compute}{stage} "
            f"({how}; predicted {llm.plan.estimate.throughput:.1f} tok/s)")
