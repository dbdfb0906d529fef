"""What this machine can do, for the bench: the throughput a policy can reach (what a measured
run is held against, from the cost model) and the compute dtypes it runs well (what every
system is run in, measured).

## The bound

For one block, the cost model (planning/cost_model.py) prices every task (one token step over all
the layers) as two sums over the layers: the compute path (matmuls and attention at the profiled
flop rates, and without a GPU the host copies, which then run on the compute cores) and the load
path (disk reads at the profiled disk bandwidth, and with a GPU the host-to-device link). With
overlap the paths run side by side, so no schedule does a step faster than the larger of the two
(without overlap, their sum): that per-step time is the bound. The cost model's own prediction
takes the larger of the two per layer instead, and is at or above the bound (`predicted_*`).

The bound is computed in the bench's process from the policy the child reports in its stats
JSON, rebuilt into a placement with the dtypes, workload and buffer settings the child plans with
(the compute dtype it ran in, the checkpoint's dtype stored), and the machine's profiled
`Hardware` for that compute dtype (`flexgen_dist.profile`, measured once and cached per dtype);
`BoundModels` keeps one per compute dtype.

## Compute dtypes

Measured on this machine, not read from CPU flags or assumed. A baseline forced to fp32 moves
twice the bytes of a 16-bit one and, under a memory cap, sends twice the layers to disk; on a CPU
with AVX-512 BF16 or AMX it also computes several times slower. On an AVX2-only CPU the opposite
holds: 16-bit matmuls are many times slower than fp32. So the bench times one matmul per dtype at
its own shapes (a decode step's rows and a prefill's, the model's hidden size) and runs each
system in every dtype that is at least `RUNS_WELL` of the fastest at every shape; each system
then reports its best dtype and batch. A 16-bit dtype saves at most half the bytes, so one
computing at under half the best rate loses wherever compute matters. `--baseline-dtypes` /
`--ours-dtypes` name the dtypes instead of measuring.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import UserError
from ..planning.compression import CompressionConfig
from ..planning.cost_model import TaskTime, estimate
from ..machine.hardware import Hardware
from ..spec.layout import Unit, model_units
from ..planning.place import plan_placement
from ..planning.placement import Buffers, Dtypes, Placement, Workload
from ..planning.policy import Policy
from ..spec.model import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bound:
    """The bound of one policy on one machine for one block (tokens/s as `Stats` counts them)."""

    prefill_tokens_per_s: float  # prompt tokens of the block / the prefill step's bound
    decode_tokens_per_s: float | None  # block * (gen_len - 1) / the decode steps' bounds (None: gen_len 1)
    limiter: str  # what the decode steps wait for, summed over them: "compute" or "load"
    decode_compute_s: float  # the decode steps' compute paths, summed
    decode_load_s: float  # ... and their load paths
    predicted_decode_tokens_per_s: float | None  # the cost model's estimate (larger path per layer)
    predicted_block_s: float  # the cost model's latency of the block, prefill to last token

    def fraction(self, measured_decode_tokens_per_s: float) -> float | None:
        """Measured decode throughput / the bound (None without a decode bound)."""
        if not self.decode_tokens_per_s:
            return None
        return measured_decode_tokens_per_s / self.decode_tokens_per_s

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def policy_from_stats(policy: dict) -> Policy:
    """The `Policy` a run used, from the "policy" object of its `--stats-json` file.

    A field this version does not know is refused (ValueError): a bound silently computed without
    it would be a bound for another policy."""
    fields = dict(policy)
    known = {f.name for f in dataclasses.fields(Policy)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"the run's policy has fields this bench does not know: {', '.join(unknown)}")
    if isinstance(fields.get("compression"), dict):
        fields["compression"] = CompressionConfig(**fields["compression"])
    return Policy(**fields)


def _step_s(task: TaskTime, overlap: bool) -> float:
    return max(task.compute_s, task.load_s) if overlap else task.compute_s + task.load_s


@dataclass(frozen=True)
class BoundModel:
    """Everything but the policy that the child plans with; built once per bench invocation."""

    spec: ModelSpec
    units: tuple[Unit, ...]
    dtypes: Dtypes
    workload: Workload
    buffers: Buffers
    hardware: Hardware
    hardware_source: str  # which profile (file) or --hardware the speeds came from, for the output

    def placement(self, policy: Policy) -> Placement:
        return plan_placement(self.spec, self.units, policy, dtypes=self.dtypes, workload=self.workload,
                              buffers=self.buffers)

    def bound(self, policy: Policy) -> Bound:
        block = policy.block_size
        est = estimate(self.placement(policy), self.hardware, num_prompts=block)
        tasks = est.stages[0].tasks()
        prefill_s = _step_s(tasks[0], policy.overlap)
        decode = tasks[1:]
        decode_s = sum(_step_s(t, policy.overlap) for t in decode)
        compute_s = sum(t.compute_s for t in decode)
        load_s = sum(t.load_s for t in decode)
        decode_tokens = block * (self.workload.gen_len - 1)
        return Bound(
            prefill_tokens_per_s=block * self.workload.prompt_len / prefill_s,
            decode_tokens_per_s=decode_tokens / decode_s if decode else None,
            limiter="compute" if compute_s >= load_s else "load",
            decode_compute_s=compute_s,
            decode_load_s=load_s,
            predicted_decode_tokens_per_s=decode_tokens / est.decode_s if decode else None,
            predicted_block_s=est.block_s,
        )


class BoundModels:
    """One `BoundModel` per compute dtype, each built the first time a run in that dtype asks."""

    def __init__(self, build: Callable[[str | None], BoundModel],
                 on_build: Callable[[str | None, BoundModel], None] | None = None):
        self._build = build
        self._on_build = on_build
        self.built: dict[str | None, BoundModel] = {}

    def for_dtype(self, compute_dtype: str | None) -> BoundModel:
        """The bound model of runs computing in `compute_dtype` (None: the engine's default)."""
        if compute_dtype not in self.built:
            self.built[compute_dtype] = model = self._build(compute_dtype)
            if self._on_build is not None:
                self._on_build(compute_dtype, model)
        return self.built[compute_dtype]


def build_bound_model(model_dir: str | Path, *, prompt_len: int, gen_len: int, offload_dir: str | Path,
                      hardware: str | Path | None = None, compute_dtype: str | None = None) -> BoundModel:
    """The child's planning inputs (see the module docstring) and this machine's speeds: the
    `--hardware` file or preset when given, else the cached profile of this host, device, compute
    dtype and offload file system, measured now (a quick profile, seconds) when there is none.
    `compute_dtype`: what the child computed in (None: the engine's default rule)."""
    from ..api.runtime import Runtime  # torch: the device and dtype rules the child follows
    from ..machine.presets import hardware_from_arg
    from ..profile import cache_path, load_or_profile

    spec = ModelSpec.from_dir(model_dir)
    runtime = Runtime(compute_dtype=compute_dtype)
    device = runtime.resolve_device()
    dtypes = runtime.dtypes(spec, device)
    buffers = Buffers(separate_gpu=device.type == "cuda", prefetch_depth=runtime.prefetch_depth,
                      io_threads=runtime.disk_io.threads, chunk_bytes=runtime.disk_io.chunk_bytes)
    if hardware is not None:
        machine, source = hardware_from_arg(hardware), f"--hardware {hardware}"
    else:
        path = cache_path(device.type, dtypes.compute, offload_dir)
        fresh = not path.exists()
        machine = load_or_profile(device.type, offload_dir, compute_dtype=dtypes.compute)
        source = f"profile {path}" + (" (measured now: quick)" if fresh else "")
    return BoundModel(spec=spec, units=tuple(model_units(spec)), dtypes=dtypes,
                      workload=Workload(prompt_len, gen_len), buffers=buffers, hardware=machine,
                      hardware_source=source)


# --- compute dtypes -------------------------------------------------------------------------------

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


def describe_dtypes(rates: Mapping[str, Sequence[float]], shapes: Sequence[MatmulShape], choice: DtypeChoice,
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
