"""Which compute dtypes the bench runs every system in: measured on this machine, not read from
CPU flags or assumed.

A baseline forced to fp32 moves twice the bytes of a 16-bit one and, under a memory cap, sends
twice the layers to disk; on a CPU with AVX-512 BF16 or AMX it also computes several times
slower. On an AVX2-only CPU the opposite holds: 16-bit matmuls are many times slower than fp32.
So the bench times one matmul per dtype at its own shapes (a decode step's rows and a prefill's,
the model's hidden size) and runs each system in every dtype that is at least `RUNS_WELL` of the
fastest at every shape; each system then reports its best dtype and batch. A 16-bit dtype saves
at most half the bytes, so one computing at under half the best rate loses wherever compute
matters. `--baseline-dtypes` / `--ours-dtypes` name the dtypes instead of measuring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from ..errors import UserError

DTYPES = ("float32", "float16", "bfloat16")
MEASURED = "measured"  # the flags' default: the dtypes that run well here (`choose_dtypes`)
RUNS_WELL = 0.5  # a dtype is run when its matmul rate is at least this share of the fastest at every shape
DECODE_ROWS = 32  # a decode step's rows: one batch (the bench's blocks are 32 wide)
PREFILL_ROWS = 512  # a prefill's rows (prompt tokens x batch), capped: its rate no longer grows


@dataclass(frozen=True)
class MatmulShape:
    """x (rows, dim) times a (dim, dim) weight, as `F.linear` takes it."""

    rows: int
    dim: int

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.dim * self.dim

    def __str__(self) -> str:
        return f"{self.rows}x{self.dim}"


def bench_shapes(hidden_size: int, prompt_len: int) -> tuple[MatmulShape, ...]:
    """The bench's matmuls: a decode step (one row per sequence of a batch) and a prefill (every
    prompt token of the smallest batch, capped at `PREFILL_ROWS`)."""
    prefill_rows = max(DECODE_ROWS, min(PREFILL_ROWS, 8 * prompt_len))
    return MatmulShape(DECODE_ROWS, hidden_size), MatmulShape(prefill_rows, hidden_size)


MIN_SAMPLE_S = 0.02  # a timed sample repeats the call until it lasts this long (a tiny matmul takes microseconds)


def _seconds(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    """Seconds of one fn() call, the fastest of `repeats` samples (after a warm-up call) of as many calls
    as last `MIN_SAMPLE_S` together."""
    fn()
    sync()
    calls = 1
    while True:  # how many calls make a sample (timeit's autorange)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        if time.perf_counter() - start >= MIN_SAMPLE_S:
            break
        calls *= 2
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls)
    return min(times)  # the least disturbed sample: other work on the machine only adds time


def measure_matmul_rates(dtypes: Sequence[str], shapes: Sequence[MatmulShape], *, device: str = "cpu",
                         repeats: int = 3) -> dict[str, tuple[float, ...]]:
    """FLOP/s of `F.linear` in each dtype at each shape on `device` (random operands; the fastest of
    `repeats` timed samples after a warm-up): {dtype: (rate at shapes[0], rate at shapes[1], ...)}."""
    import torch
    import torch.nn.functional as F

    target = torch.device(device)
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    rates: dict[str, tuple[float, ...]] = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        found = []
        for shape in shapes:
            x = torch.randn(shape.rows, shape.dim, generator=generator).to(target, dtype)  # (rows, C)
            w = torch.randn(shape.dim, shape.dim, generator=generator).to(target, dtype)  # (C_out, C)
            found.append(shape.flops / _seconds(lambda: F.linear(x, w), sync, repeats))
        rates[name] = tuple(found)
    if target.type == "cuda":
        torch.cuda.empty_cache()  # the bench's children need the GPU's memory, not this process
    return rates


@dataclass(frozen=True)
class DtypeChoice:
    """The outcome of `choose_dtypes`."""

    run: tuple[str, ...]
    """The dtypes to run, fastest first (by their slowest share of the best rate)."""
    left_out: dict[str, str]
    """Each dtype not run, with why: 'float16: 0.11 of bfloat16 at 512x2048'."""


def choose_dtypes(rates: Mapping[str, Sequence[float]], shapes: Sequence[MatmulShape]) -> DtypeChoice:
    """The dtypes whose rate is at least `RUNS_WELL` of the fastest dtype's at every shape; when no
    dtype is (each fastest at one shape and slow at another), the one whose worst share is highest."""
    if not rates:
        raise ValueError("no dtype was measured")
    best = [max(r[i] for r in rates.values()) for i in range(len(shapes))]
    share = {name: [r[i] / best[i] for i in range(len(shapes))] for name, r in rates.items()}
    by_worst_share = sorted(rates, key=lambda n: -min(share[n]))
    run = [name for name in by_worst_share if min(share[name]) >= RUNS_WELL] or by_worst_share[:1]
    left_out = {}
    for name in rates:
        if name in run:
            continue
        worst = min(range(len(shapes)), key=lambda i: share[name][i])
        fastest = max(rates, key=lambda n: rates[n][worst])
        left_out[name] = f"{share[name][worst]:.2f} of {fastest} at {shapes[worst]}"
    return DtypeChoice(run=tuple(run), left_out=left_out)


def describe(rates: Mapping[str, Sequence[float]], shapes: Sequence[MatmulShape], choice: DtypeChoice,
             device: str) -> str:
    """One line for people: the rates measured and what runs."""
    measured = "; ".join(f"{name} " + "/".join(f"{r / 1e9:.1f}" for r in rates[name]) for name in rates)
    line = (f"compute dtypes: matmul GFLOP/s on {device} at {' and '.join(map(str, shapes))} (rows x dim): "
            f"{measured}; running {', '.join(choice.run)}")
    if choice.left_out:
        line += " (left out: " + "; ".join(f"{name} {why}" for name, why in choice.left_out.items()) + ")"
    return line


def parse_dtypes(text: str, flag: str, allowed: Sequence[str] = DTYPES) -> list[str] | None:
    """A dtype flag's value: None for `measured`, else the listed dtypes (each one of `allowed`)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if items == [MEASURED]:
        return None
    unknown = [item for item in items if item not in allowed]
    if not items or unknown:
        raise UserError(f"{flag} {text!r}: use {MEASURED} or a comma-separated list of {', '.join(allowed)}")
    return list(dict.fromkeys(items))
