"""The zig-zag block schedule for one rank, as data (no torch).

A block is `num_batches` GPU batches of sequences. A *task* is one token step of one block on
this rank's layers. Within a task the layer's weights are loaded once and every GPU batch is
computed with them before the next layer (the zig-zag of FlexGen's Algorithm 1). Prefetch is
resolved here, with explicit indices:

- the next layer's weights (`LoadWeight`) are requested when a layer starts, so they load while
  it computes; the next task's first layer is requested when the last layer starts;
- the next compute's KV cache (`LoadCache`) is requested just before the current compute;
- `StoreCache` / `StoreActivation` follow their compute.

Layer indices are this rank's schedule layers, 0..num_layers-1 (the input embedding is layer 0
of the first stage, the head the last layer of the last stage). With several ranks, the first
layer of a non-first stage receives its input (`RecvActivation`) and the last layer of a
non-last stage sends its output (`SendActivation`); the last stage sends each sampled token to
the first (`SendTokens`), which receives them (`RecvTokens`) before embedding them. Tasks come in
groups: the blocks of a group are in flight together (see pipeline.py); the first stage receives
a group's final tokens at the group's end.

The engine walks the ops in order; loads and receives may complete asynchronously, and every
input of a compute is requested before it (checked by the tests).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoadWeight:
    block_idx: int
    token_idx: int
    layer_idx: int


@dataclass(frozen=True)
class FreeWeight:
    block_idx: int
    token_idx: int
    layer_idx: int


@dataclass(frozen=True)
class LoadCache:
    block_idx: int
    token_idx: int
    layer_idx: int
    batch_idx: int


@dataclass(frozen=True)
class StoreCache:
    block_idx: int
    token_idx: int
    layer_idx: int
    batch_idx: int


@dataclass(frozen=True)
class LoadActivation:
    """The hidden state of a batch that layer `layer_idx - 1` stored."""

    block_idx: int
    token_idx: int
    layer_idx: int
    batch_idx: int


@dataclass(frozen=True)
class StoreActivation:
    block_idx: int
    token_idx: int
    layer_idx: int
    batch_idx: int


@dataclass(frozen=True)
class Compute:
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
    block_idx: int
    token_idx: int
    batch_idx: int
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
    block_idx: int
    token_idx: int
    batch_idx: int
    src: int


Op = (
    LoadWeight | FreeWeight | LoadCache | StoreCache | LoadActivation | StoreActivation | Compute
    | SendActivation | RecvActivation | SendTokens | RecvTokens
)
Task = tuple[int, int]  # (block_idx, token_idx)


@dataclass(frozen=True)
class StageShape:
    num_layers: int  # schedule layers on this rank (embedding and head included where held)
    num_batches: int  # GPU batches per block
    cache_layers: frozenset[int]  # layers that keep a KV cache
    rank: int = 0
    num_ranks: int = 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.num_ranks - 1

    def needs_cache_load(self, token_idx: int, layer_idx: int) -> bool:
        # The prefill has no past; decode steps read the cache written so far.
        return token_idx > 0 and layer_idx in self.cache_layers


def compute_order(groups: list[list[Task]], stage: StageShape) -> list[Compute]:
    return [
        Compute(b, t, j, k)
        for group in groups
        for b, t in group
        for j in range(stage.num_layers)
        for k in range(stage.num_batches)
    ]


def rank_schedule(groups: list[list[Task]], stage: StageShape, prefetch_depth: int = 1) -> list[Op]:
    """All ops of this rank for the given task groups, in issue order.

    prefetch_depth: how many layers ahead weights are requested (1 = the next layer while this
    one computes; each extra layer costs one more layer of weights in memory)."""
    if prefetch_depth < 1:
        raise ValueError("prefetch_depth must be >= 1")
    computes = compute_order(groups, stage)
    if not computes:
        return []
    layer_starts = computes[:: stage.num_batches]  # the first compute of every (block, token, layer)
    last_layer, last_batch = stage.num_layers - 1, stage.num_batches - 1
    ring = stage.num_ranks > 1
    group_end = {}  # index of a group's last compute -> that group's final tasks
    i = -1
    for group in groups:
        i += len(group) * stage.num_layers * stage.num_batches
        final = {}
        for b, t in group:
            final[b] = max(t, final.get(b, t))
        group_end[i] = sorted(final.items())
    ops: list[Op] = [LoadWeight(c.block_idx, c.token_idx, c.layer_idx) for c in layer_starts[:prefetch_depth]]
    for i, c in enumerate(computes):
        b, t, j, k = c.block_idx, c.token_idx, c.layer_idx, c.batch_idx
        if k == 0:  # a layer starts: request the weights `prefetch_depth` layers ahead in compute order
            ahead = i // stage.num_batches + prefetch_depth
            if ahead < len(layer_starts):
                n = layer_starts[ahead]
                ops.append(LoadWeight(n.block_idx, n.token_idx, n.layer_idx))
            if j == 0 and not stage.is_first:  # the task's inputs from the previous stage
                ops.extend(RecvActivation(b, t, kk, stage.rank - 1) for kk in range(stage.num_batches))
        if i == 0 and stage.needs_cache_load(t, j):
            ops.append(LoadCache(b, t, j, k))
        if i + 1 < len(computes):  # prefetch the next compute's cache
            n = computes[i + 1]
            if stage.needs_cache_load(n.token_idx, n.layer_idx):
                ops.append(LoadCache(n.block_idx, n.token_idx, n.layer_idx, n.batch_idx))
        if j == 0 and t > 0 and stage.is_first and ring:
            ops.append(RecvTokens(b, t - 1, k, stage.num_ranks - 1))
        if j > 0:
            ops.append(LoadActivation(b, t, j, k))
        ops.append(c)
        if j in stage.cache_layers:
            ops.append(StoreCache(b, t, j, k))
        if j < last_layer:
            ops.append(StoreActivation(b, t, j, k))
        elif not stage.is_last:
            ops.append(SendActivation(b, t, k, stage.rank + 1))
        elif ring:
            ops.append(SendTokens(b, t, k, 0))
        if k == last_batch:
            ops.append(FreeWeight(b, t, j))
        if stage.is_first and ring and i in group_end:  # the group's last tokens come back round the ring
            for fb, ft in group_end[i]:
                ops.extend(RecvTokens(fb, ft, kk, stage.num_ranks - 1) for kk in range(stage.num_batches))
    return ops


def block_tasks(num_tokens: int, block_idx: int = 0) -> list[Task]:
    return [(block_idx, t) for t in range(num_tokens)]


@dataclass(frozen=True)
class BlockShape:
    """One block on one rank holding every layer (the single-process case)."""

    num_tokens: int
    num_layers: int
    num_batches: int
    cache_layers: frozenset[int]


def block_schedule(shape: BlockShape, prefetch_depth: int = 1) -> list[Op]:
    stage = StageShape(shape.num_layers, shape.num_batches, shape.cache_layers)
    return rank_schedule([block_tasks(shape.num_tokens)], stage, prefetch_depth)
