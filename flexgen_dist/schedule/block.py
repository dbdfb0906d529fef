"""The zig-zag block schedule for one rank, as data (no torch).

A block is `num_batches` GPU batches of sequences. A *task* is one token step of one block on
this rank's layers. Within a task the layer's weights are loaded once and every GPU batch is
computed with them before the next layer (the zig-zag of FlexGen's Algorithm 1). Prefetch is
resolved here, with explicit indices:

- the next layer's weights (`LoadWeight`) are requested when a layer starts, so they load while
  it computes; the next task's first layer is requested when the last layer starts;
- the next compute's KV cache (`LoadCache`) is requested just before the current compute, unless
  the current compute stores the rows it reads (a stage of one cache layer, one GPU batch, one
  lane): then right after that `StoreCache`;
- `StoreCache` / `StoreActivation` follow their compute.

Every op's `layer_idx` is the GLOBAL schedule layer, the same on every rank: 0 is the input
embedding, 1..L the decoder layers, L + 1 the head. A rank holds a contiguous range of them
(`StageShape.layers`). With several ranks, the first
layer of a non-first stage receives its input (`RecvActivation`) and the last layer of a
non-last stage sends its output (`SendActivation`); the last stage sends each sampled token to
the first (`SendTokens`), which receives them (`RecvTokens`) before embedding them. Before a
task's activations, each stage tells the next whether the block is still live (`SendControl`):
the first stage knows once the previous token of every GPU batch is back, so when every
sequence of a block has stopped, its remaining tasks are skipped on every rank (their messages
still flow, empty, so no rank waits for one that never comes).

Blocks run in lanes (schedule/pipeline.py): with P ranks, P blocks are in flight and a lane
starts its next block as soon as its block is done, so the pipeline does not drain between
blocks; the first stage receives a block's final tokens just before its lane's next task.

`OpenBlock` comes before the first op that needs a block's state (its KV cache, activations,
inputs) and `CloseBlock` after the last one, so the engine never infers a block's lifetime from
other ops. Weight loads do not need block state and may come earlier (prefetch across blocks).

The engine walks the ops in order; loads and receives may complete asynchronously, and every
input of a compute is requested before it (checked by the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

from .pipeline import LaneTask, Task, token_receives  # noqa: F401 (Task, LaneTask: the schedule's vocabulary)


@dataclass(frozen=True)
class OpenBlock:
    """Set up a block's state (KV cache, activation homes) before its first op that needs it."""

    block_idx: int


@dataclass(frozen=True)
class CloseBlock:
    """Collect a block's results and free its state after its last op on this rank."""

    block_idx: int


@dataclass(frozen=True)
class LoadWeight:
    """Load the weights of schedule layer `layer_idx` (global) for task (block, token)."""

    block_idx: int
    token_idx: int
    layer_idx: int


@dataclass(frozen=True)
class FreeWeight:
    """The task is done with layer `layer_idx`'s loaded weights: their buffers may be reused."""

    block_idx: int
    token_idx: int
    layer_idx: int


@dataclass(frozen=True)
class LoadCache:
    """Bring the KV cache of (layer, batch) where the compute of (block, token, layer, batch) reads it."""

    block_idx: int
    token_idx: int
    layer_idx: int
    batch_idx: int


@dataclass(frozen=True)
class StoreCache:
    """Write this step's new keys and values of (layer, batch) to the cache's tier."""

    block_idx: int
    token_idx: int
    layer_idx: int
    batch_idx: int


@dataclass(frozen=True)
class LoadActivation:
    """The hidden state of a batch that layer `layer_idx - 1` stored, for layer `layer_idx`."""

    block_idx: int
    token_idx: int
    layer_idx: int
    batch_idx: int


@dataclass(frozen=True)
class StoreActivation:
    """The hidden state that layer `layer_idx` computed, to the batch's activation tier."""

    block_idx: int
    token_idx: int
    layer_idx: int
    batch_idx: int


@dataclass(frozen=True)
class Compute:
    """Schedule layer `layer_idx` (global) on GPU batch `batch_idx` of (block, token)."""

    block_idx: int
    token_idx: int
    layer_idx: int
    batch_idx: int


@dataclass(frozen=True)
class SendActivation:
    """Hidden state of (block, token, batch) out of this stage's last layer to rank `dst`."""

    block_idx: int
    token_idx: int
    batch_idx: int
    dst: int


@dataclass(frozen=True)
class RecvActivation:
    """Hidden state of (block, token, batch) from rank `src`, the input of this stage's first layer."""

    block_idx: int
    token_idx: int
    batch_idx: int
    src: int


@dataclass(frozen=True)
class SendControl:
    """Whether (block, token) is still live, from this stage to rank `dst` (the next), before the
    task's activations: a block whose every sequence has stopped ends on every rank."""

    block_idx: int
    token_idx: int
    dst: int


@dataclass(frozen=True)
class RecvControl:
    """Whether (block, token) is still live, from rank `src` (the previous stage)."""

    block_idx: int
    token_idx: int
    src: int


@dataclass(frozen=True)
class SendTokens:
    """Sampled ids of (block, token, batch) from the last stage to the first."""

    block_idx: int
    token_idx: int
    batch_idx: int
    dst: int


@dataclass(frozen=True)
class RecvTokens:
    """Sampled ids of (block, token, batch), received by the first stage from the last."""

    block_idx: int
    token_idx: int
    batch_idx: int
    src: int


Op = (
    OpenBlock | CloseBlock | LoadWeight | FreeWeight | LoadCache | StoreCache | LoadActivation | StoreActivation
    | Compute | SendActivation | RecvActivation | SendControl | RecvControl | SendTokens | RecvTokens
)


@dataclass(frozen=True)
class StageShape:
    """What one rank holds: a contiguous range of global schedule layers."""

    layers: range  # global schedule layers on this rank (embedding and head included where held)
    num_batches: int  # GPU batches per block
    cache_layers: frozenset[int]  # global layers that keep a KV cache
    rank: int = 0
    num_ranks: int = 1

    def __post_init__(self) -> None:
        if len(self.layers) < 1 or self.layers.step != 1:
            raise ValueError(f"a stage holds a contiguous, non-empty range of layers, got {self.layers}")
        if self.num_batches < 1:
            raise ValueError("num_batches must be >= 1")

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.num_ranks - 1

    def needs_cache_load(self, token_idx: int, layer_idx: int) -> bool:
        # The prefill has no past; decode steps read the cache written so far.
        return token_idx > 0 and layer_idx in self.cache_layers


def compute_order(tasks: list[LaneTask], stage: StageShape) -> list[Compute]:
    return [
        Compute(t.block_idx, t.token_idx, layer_idx, batch_idx)
        for t in tasks
        for layer_idx in stage.layers
        for batch_idx in range(stage.num_batches)
    ]


def rank_schedule(tasks: list[LaneTask], stage: StageShape, prefetch_depth: int = 1) -> list[Op]:
    """All ops of this rank for the given tasks (schedule/pipeline.py orders them), in issue order.

    prefetch_depth: how many layers ahead weights are requested (1 = the next layer while this
    one computes; each extra layer costs one more layer of weights in memory)."""
    if prefetch_depth < 1:
        raise ValueError("prefetch_depth must be >= 1")
    computes = compute_order(tasks, stage)
    if not computes:
        return []
    num_batches = stage.num_batches
    layer_starts = computes[::num_batches]  # the first compute of every (block, token, layer)
    first_layer, last_layer, last_batch = stage.layers[0], stage.layers[-1], num_batches - 1
    ring = stage.num_ranks > 1
    at_consumer, early = token_receives(tasks) if ring and stage.is_first else ({}, {})
    consumed_by = {consumer: tasks[i].task for i, consumer in at_consumer.items()}
    per_task = len(stage.layers) * num_batches
    src = stage.num_ranks - 1
    ops: list[Op] = [LoadWeight(c.block_idx, c.token_idx, c.layer_idx) for c in layer_starts[:prefetch_depth]]
    for i, c in enumerate(computes):
        block_idx, token_idx, layer_idx, batch_idx = c.block_idx, c.token_idx, c.layer_idx, c.batch_idx
        task_idx = i // per_task
        if i % per_task == 0:  # a task starts: tokens received ahead of their consumer (or never consumed)
            for j in early.get(task_idx, ()):
                ops.extend(RecvTokens(*tasks[j].task, other, src) for other in range(num_batches))
        if batch_idx == 0:  # a layer starts: request the weights `prefetch_depth` layers ahead in compute order
            ahead = i // num_batches + prefetch_depth
            if ahead < len(layer_starts):
                n = layer_starts[ahead]
                ops.append(LoadWeight(n.block_idx, n.token_idx, n.layer_idx))
            if layer_idx == first_layer and not stage.is_first:  # the task's inputs from the previous stage
                ops.append(RecvControl(block_idx, token_idx, stage.rank - 1))
                ops.extend(RecvActivation(block_idx, token_idx, other, stage.rank - 1) for other in range(num_batches))
        if i == 0 and stage.needs_cache_load(token_idx, layer_idx):
            ops.append(LoadCache(block_idx, token_idx, layer_idx, batch_idx))
        next_load = _next_cache_load(computes, i, stage)
        # A stage of one cache layer, one GPU batch, one lane: the next compute reads the rows this
        # one stores, so its load waits for that store; every other load overlaps this compute.
        reads_this_store = next_load is not None and _cache_of(next_load) == _cache_of(c)
        if next_load is not None and not reads_this_store:
            ops.append(next_load)
        if layer_idx == first_layer and task_idx in consumed_by:  # the previous token, just in time
            ops.append(RecvTokens(*consumed_by[task_idx], batch_idx, src))
        if layer_idx > first_layer:
            ops.append(LoadActivation(block_idx, token_idx, layer_idx, batch_idx))
        ops.append(c)
        if layer_idx in stage.cache_layers:
            ops.append(StoreCache(block_idx, token_idx, layer_idx, batch_idx))
        if reads_this_store:
            ops.append(next_load)
        if layer_idx < last_layer:
            ops.append(StoreActivation(block_idx, token_idx, layer_idx, batch_idx))
        elif not stage.is_last:
            if batch_idx == 0:  # the first stage has every token of the block by now: live or not
                ops.append(SendControl(block_idx, token_idx, stage.rank + 1))
            ops.append(SendActivation(block_idx, token_idx, batch_idx, stage.rank + 1))
        elif ring:
            ops.append(SendTokens(block_idx, token_idx, batch_idx, 0))
        if batch_idx == last_batch:
            ops.append(FreeWeight(block_idx, token_idx, layer_idx))
    for j in early.get(len(tasks), ()):
        ops.extend(RecvTokens(*tasks[j].task, other, src) for other in range(num_batches))
    return _with_block_lifetimes(ops)


def _next_cache_load(computes: list[Compute], i: int, stage: StageShape) -> LoadCache | None:
    """The load of the KV cache that the compute after `computes[i]` reads, if it reads one."""
    if i + 1 == len(computes):
        return None
    n = computes[i + 1]
    if not stage.needs_cache_load(n.token_idx, n.layer_idx):
        return None
    return LoadCache(n.block_idx, n.token_idx, n.layer_idx, n.batch_idx)


def _cache_of(op: Compute | LoadCache) -> tuple[int, int, int]:
    """The KV cache an op touches: (block, layer, batch)."""
    return op.block_idx, op.layer_idx, op.batch_idx


def _with_block_lifetimes(ops: list[Op]) -> list[Op]:
    """Insert OpenBlock before a block's first op that needs its state and CloseBlock after its
    last op. Weight loads and frees need no block state (they prefetch across blocks)."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, op in enumerate(ops):
        if not isinstance(op, (LoadWeight, FreeWeight)):
            first.setdefault(op.block_idx, i)
        last[op.block_idx] = i
    opens = {i: b for b, i in first.items()}
    closes = {i: b for b, i in last.items()}
    out: list[Op] = []
    for i, op in enumerate(ops):
        if i in opens:
            out.append(OpenBlock(opens[i]))
        out.append(op)
        if i in closes:
            out.append(CloseBlock(closes[i]))
    return out
