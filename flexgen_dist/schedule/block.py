"""The zig-zag block schedule for one rank, as data (no torch).

A block is `num_batches` GPU batches of sequences. For each token, for each layer, the layer's
weights are loaded once and every GPU batch is computed with them before moving on (the zig-zag
of FlexGen's Algorithm 1). Prefetch is resolved here, with explicit indices:

- `LoadWeight(t, j + 1)` is issued when layer j starts, so it overlaps layer j's compute;
- `LoadCache` of the next compute is issued just before the current compute;
- `StoreCache` / `StoreActivation` follow their compute.

Layer indices are schedule layers: 0 is the input embedding, 1..L the decoder layers, L + 1 the
head. The engine walks the ops in order; loads may complete asynchronously, everything a
compute needs is issued before it (checked by the tests).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoadWeight:
    token_idx: int
    layer_idx: int


@dataclass(frozen=True)
class FreeWeight:
    token_idx: int
    layer_idx: int


@dataclass(frozen=True)
class LoadCache:
    token_idx: int
    layer_idx: int
    batch_idx: int


@dataclass(frozen=True)
class StoreCache:
    token_idx: int
    layer_idx: int
    batch_idx: int


@dataclass(frozen=True)
class LoadActivation:
    """The hidden state of batch `batch_idx` that layer `layer_idx - 1` stored."""

    token_idx: int
    layer_idx: int
    batch_idx: int


@dataclass(frozen=True)
class StoreActivation:
    token_idx: int
    layer_idx: int
    batch_idx: int


@dataclass(frozen=True)
class Compute:
    token_idx: int
    layer_idx: int
    batch_idx: int


Op = LoadWeight | FreeWeight | LoadCache | StoreCache | LoadActivation | StoreActivation | Compute


@dataclass(frozen=True)
class BlockShape:
    num_tokens: int  # tokens to generate; token 0 is the prefill
    num_layers: int  # schedule layers on this rank (embedding and head included when held)
    num_batches: int  # GPU batches per block
    cache_layers: frozenset[int]  # schedule layers that keep a KV cache

    def needs_cache_load(self, token_idx: int, layer_idx: int) -> bool:
        # The prefill has no past; decode steps read the cache written so far.
        return token_idx > 0 and layer_idx in self.cache_layers


def compute_order(shape: BlockShape) -> list[Compute]:
    return [
        Compute(t, j, k)
        for t in range(shape.num_tokens)
        for j in range(shape.num_layers)
        for k in range(shape.num_batches)
    ]


def block_schedule(shape: BlockShape) -> list[Op]:
    """All ops of one block, in issue order."""
    computes = compute_order(shape)
    ops: list[Op] = []
    if not computes:
        return ops
    ops.append(LoadWeight(0, 0))
    for i, c in enumerate(computes):
        t, j, k = c.token_idx, c.layer_idx, c.batch_idx
        if k == 0:  # a layer starts: prefetch the next layer's weights (next token's first layer at the end)
            nxt = (t, j + 1) if j + 1 < shape.num_layers else (t + 1, 0)
            if nxt[0] < shape.num_tokens:
                ops.append(LoadWeight(*nxt))
        if i == 0 and shape.needs_cache_load(t, j):
            ops.append(LoadCache(t, j, k))
        if i + 1 < len(computes):  # prefetch the next compute's cache
            n = computes[i + 1]
            if shape.needs_cache_load(n.token_idx, n.layer_idx):
                ops.append(LoadCache(n.token_idx, n.layer_idx, n.batch_idx))
        if j > 0:
            ops.append(LoadActivation(t, j, k))
        ops.append(c)
        if j in shape.cache_layers:
            ops.append(StoreCache(t, j, k))
        if j + 1 < shape.num_layers:
            ops.append(StoreActivation(t, j, k))
        if k == shape.num_batches - 1:
            ops.append(FreeWeight(t, j))
    return ops
