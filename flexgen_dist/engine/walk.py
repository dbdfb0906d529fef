"""What one `Engine.run` tracks while it walks the plan (`Walk`), the stretches of steps a refill
run plans for its open blocks (`Walk.refill_plan`), and what the run returns (`RunResult`); the
inf/NaN watch over layer outputs (`FiniteWatch`) and the traces of its ops (`Tracer`)."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager, Protocol

import torch

from ..errors import UserError
from ..schedule import block as ops
from ..schedule.pipeline import LaneTask
from .blocks import Block, BlockResult, BlockState
from .refill import Lender
from .sampling import Sampler

if TYPE_CHECKING:  # annotations only: a single process has no comm
    from ..parallel.comm import SendHandle


@dataclass
class RunResult:
    blocks: list[BlockResult]  # meaningful on the first stage only
    prefill_s: float  # wall time in prefill tasks (token 0), waits included
    decode_s: float  # the rest: decode steps (with the prefills of prompts that took a row)
    row_steps: int = 0  # block rows x the steps each block ran (on the rank that records tokens)
    prefill_prompt_tokens: int = 0  # real prompt tokens of the blocks prefilled in prefill tasks (token 0)
    prefill_sequences: int = 0  # and their sequences (the others started in a refilled row)


@dataclass
class Walk:
    """Everything one `Engine.run` call tracks while it walks the plan."""

    blocks: list[Block]
    tasks: list[ops.LaneTask]
    stage: ops.StageShape
    sampler: Sampler
    finite: FiniteWatch  # inf / NaN in layer outputs, read one task late
    on_block_done: Callable[[int, BlockResult], None] | None = None  # (block_idx, its result)
    states: dict[int, BlockState] = field(default_factory=dict)  # open blocks
    results: dict[int, BlockResult] = field(default_factory=dict)  # closed blocks
    weight_loads: dict[ops.LoadWeight, object] = field(default_factory=dict)  # -> future of LoadedWeights
    cache_loads: dict[ops.LoadCache, object] = field(default_factory=dict)  # -> future of KVLease
    sends: list[SendHandle] = field(default_factory=list)  # not yet completed
    dead_from: dict[int, int] = field(default_factory=dict)  # block -> its first task with every row stopped
    phase_s: list[float] = field(default_factory=lambda: [0.0, 0.0])  # prefill, decode
    lender: Lender | None = None  # with refill: the prompts waiting for a row of the open blocks
    lanes: list[int] = field(default_factory=list)  # with refill: the open blocks (one per lane) still running
    row_steps: int = 0

    def is_dead(self, block_idx: int, token_idx: int) -> bool:
        """Every row of the block stopped before this task (pipelines: its ops load and compute nothing)."""
        return token_idx >= self.dead_from.get(block_idx, token_idx + 1)

    def sent(self, handle: SendHandle) -> None:
        """A message on its way to a peer: the run waits for it before it ends."""
        self.sends.append(handle)

    def mark_dead(self, block_idx: int, token_idx: int) -> None:
        self.dead_from[block_idx] = min(token_idx, self.dead_from.get(block_idx, token_idx))

    def refill_plan(self, first_token: int, *, num_ranks: int, prefetch_depth: int) -> list:
        """The next steps of the open blocks of a refill run, one per lane, the lanes taking turns:
        as many steps as the longest limit (the ops of open-ended blocks are made a stretch at a
        time; a block closes once every row is idle). Every rank makes the same stretch: a block
        leaves once some task of the last stretch ran dead, which every rank knows by its end."""
        # One rank closes a block as soon as its rows are idle; a pipeline only at a stretch's end
        # (it runs the rest of the stretch dead: messages, no compute), so its stretches are short.
        steps = max(max(self.blocks[b].max_new_tokens for b in self.lanes), 16) if num_ranks == 1 else 16
        tasks = [LaneTask(b, token_idx, lane) for token_idx in range(first_token, first_token + steps)
                 for lane, b in enumerate(self.lanes)]
        plan = ops.rank_schedule(tasks, self.stage, prefetch_depth)
        return [op for op in plan if not isinstance(op, ops.CloseBlock)
                and not (first_token > 0 and isinstance(op, ops.OpenBlock))]


# --- Inf and NaN in layer outputs, found without stalling the device.
# 
# Without a check, NaN logits sample token 0 forever and a run ends "successfully". Each layer
# output sets one flag on the device (no wait). When a task's last layer on this stage is done, its
# flags start their way to the host (a non-blocking copy and an event on a GPU) and are read one
# task later, by which time the copy has long landed: reading them at once would make the host
# wait for every kernel queued so far, on every stage, for every batch and token. A stage whose
# last layer is the head samples right there (a wait it pays anyway), so it reads its flags at
# once; every block is read in full before it closes, so no result leaves with a NaN behind it.

@dataclass(frozen=True)
class TaskKey:
    block_idx: int
    token_idx: int
    batch_idx: int


@dataclass
class _Sent:
    key: TaskKey
    flags: torch.Tensor  # (layers,) bool on the host (pinned there on a GPU)
    done: object  # a CUDA event recorded after the copy, or None


class FiniteWatch:
    """Flags per layer of one stage; `describe(layer_idx)` names a schedule layer for the message."""

    def __init__(self, layers: range, device: torch.device, describe, compute_dtype: str):
        self.layers, self.device, self.describe, self.compute_dtype = layers, device, describe, compute_dtype
        self._flags: dict[tuple[int, int], torch.Tensor] = {}  # (block, batch) -> flags of the task running
        self._sent: list[_Sent] = []  # finished tasks whose flags are not read yet, oldest first

    def note(self, key: TaskKey, layer_idx: int, x: torch.Tensor) -> None:
        """Flag whether `x`, the output of `layer_idx`, holds inf or NaN (on its device, no wait)."""
        flags = self._flags.get((key.block_idx, key.batch_idx))
        if flags is None:
            flags = self._flags[key.block_idx, key.batch_idx] = torch.zeros(len(self.layers), dtype=torch.bool, device=x.device)
        flags[layer_idx - self.layers[0]] = ~torch.isfinite(x).all()

    def task_done(self, key: TaskKey, *, read_now: bool) -> None:
        """The stage's last layer of `key` is queued: send its flags on their way; read those of
        earlier tasks (and this one's too when `read_now`). Raises UserError on a flagged layer."""
        flags = self._flags.pop((key.block_idx, key.batch_idx))
        if flags.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(flags.device))
            self._sent.append(_Sent(key, host, done))
        else:
            self._sent.append(_Sent(key, flags, None))
        self._read(lambda sent: read_now or (sent.key.block_idx, sent.key.token_idx) != (key.block_idx, key.token_idx))

    def read_block(self, block_idx: int) -> None:
        """Read every flag of `block_idx` (before its results leave)."""
        self._read(lambda sent: sent.key.block_idx == block_idx)

    def read_all(self) -> None:
        self._read(lambda sent: True)

    def _read(self, due) -> None:
        keep = []
        for sent in self._sent:
            if not due(sent):
                keep.append(sent)
                continue
            if sent.done is not None:
                sent.done.synchronize()  # the copy, not everything queued since
            if bool(sent.flags.any()):
                self._sent = keep
                self._raise(sent)
        self._sent = keep

    def _raise(self, sent: _Sent) -> None:
        first = self.layers[0] + int(sent.flags.nonzero()[0])
        key = sent.key
        raise UserError(
            f"the output of {self.describe(first)} (schedule layer {first}) holds inf or NaN at token {key.token_idx} of "
            f"block {key.block_idx}: the checkpoint's values overflow {self.compute_dtype}; compute in float32 "
            "(or bfloat16 on a GPU) with --compute-dtype"
        )


# --- Chrome / Perfetto traces of the engine's ops (`--trace FILE.json`).
# 
# Every op becomes a complete event ("ph": "X") named after what it does (`load weight`,
# `load cache`, `compute`, `store cache`, `send activation`, `recv tokens`, ...), on the track of
# the thread that ran it, so loads on the I/O threads are seen next to the compute they overlap.
# Open the file in chrome://tracing or ui.perfetto.dev.

class Tracing(Protocol):
    """What the engine needs of a tracer: a span around each op, on the thread that runs it."""

    def span(self, name: str, cat: str) -> ContextManager[None]: ...


class Tracer:
    def __init__(self, pid: int = 0):
        self.pid = pid  # the rank
        self._events: list[dict] = []
        self._threads: dict[int, str] = {}
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def span(self, name: str, cat: str, **args):
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            thread = threading.current_thread()
            event = {
                "name": name,
                "cat": cat,
                "ph": "X",
                "ts": (start - self._t0) * 1e6,
                "dur": (end - start) * 1e6,
                "pid": self.pid,
                "tid": thread.ident,
                "args": args,
            }
            with self._lock:
                self._events.append(event)
                self._threads.setdefault(thread.ident, thread.name)

    def reset(self) -> None:
        """Forget what was recorded so far (e.g. an untimed warm-up)."""
        with self._lock:
            self._events.clear()
            self._t0 = time.perf_counter()

    def events(self) -> list[dict]:
        with self._lock:
            meta = [
                {"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid, "args": {"name": name}}
                for tid, name in self._threads.items()
            ]
            meta.append({"name": "process_name", "ph": "M", "pid": self.pid, "args": {"name": f"rank {self.pid}"}})
            return meta + list(self._events)

    def document(self) -> dict:
        """The trace as Chrome's JSON object format (the front end writes it to `--trace`)."""
        return {"traceEvents": self.events(), "displayTimeUnit": "ms"}


class NoTracer:
    """Tracing off: spans cost a function call."""

    @contextlib.contextmanager
    def span(self, name: str, cat: str, **args):
        yield
