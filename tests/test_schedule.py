"""The block schedule's invariants, checked on the op list alone (no torch)."""

import dataclasses
import itertools
import subprocess
import sys

import pytest

from flexgen_dist.schedule.block import (
    CloseBlock,
    Compute,
    FreeWeight,
    LaneTask,
    LoadActivation,
    LoadCache,
    LoadWeight,
    OpenBlock,
    StageShape,
    StoreActivation,
    StoreCache,
    rank_schedule,
)
from flexgen_dist.schedule.pipeline import lane_tasks


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """One block on one rank holding every layer (the single-process case)."""

    num_tokens: int
    num_layers: int
    num_batches: int
    cache_layers: frozenset

    @property
    def layers(self) -> range:
        return range(self.num_layers)


def block_schedule(shape: BlockShape, prefetch_depth: int = 1):
    stage = StageShape(shape.layers, shape.num_batches, shape.cache_layers)
    return rank_schedule([LaneTask(0, t) for t in range(shape.num_tokens)], stage, prefetch_depth)


SHAPES = [
    BlockShape(num_tokens=t, num_layers=j, num_batches=k, cache_layers=frozenset(range(1, j - 1)))
    for t, j, k in itertools.product((1, 2, 5), (3, 4, 7), (1, 2, 3))
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_token_layer_batch_computed_exactly_once(shape):
    computes = [(op.token_idx, op.layer_idx, op.batch_idx) for op in block_schedule(shape) if isinstance(op, Compute)]
    expected = list(itertools.product(range(shape.num_tokens), range(shape.num_layers), range(shape.num_batches)))
    assert sorted(computes) == expected
    assert len(computes) == len(set(computes))


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_weights_loaded_once_per_token_per_layer_and_freed_after_last_batch(shape, depth):
    ops = block_schedule(shape, prefetch_depth=depth)
    loads = [(op.token_idx, op.layer_idx) for op in ops if isinstance(op, LoadWeight)]
    assert sorted(loads) == list(itertools.product(range(shape.num_tokens), range(shape.num_layers)))
    for t, j in loads:
        free_at = ops.index(FreeWeight(0, t, j))
        last_use = max(i for i, op in enumerate(ops) if op == Compute(0, t, j, shape.num_batches - 1))
        assert free_at > last_use
        # every batch of the layer computes between the load and the free: loaded once, shared by all
        uses = [i for i, op in enumerate(ops) if isinstance(op, Compute) and (op.token_idx, op.layer_idx) == (t, j)]
        assert len(uses) == shape.num_batches
        assert ops.index(LoadWeight(0, t, j)) < min(uses) and max(uses) < free_at


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_load_before_its_use_and_stores_after(shape, depth):
    ops = block_schedule(shape, prefetch_depth=depth)
    pos = {op: i for i, op in enumerate(ops)}
    assert len(pos) == len(ops), "an op appears twice"
    for op in ops:
        if not isinstance(op, Compute):
            continue
        t, j, k = op.token_idx, op.layer_idx, op.batch_idx
        assert pos[LoadWeight(0, t, j)] < pos[op]
        if t > 0 and j in shape.cache_layers:
            assert pos[LoadCache(0, t, j, k)] < pos[op]
            # the cache it reads was stored by the previous token
            assert pos[StoreCache(0, t - 1, j, k)] < pos[LoadCache(0, t, j, k)]
        else:
            assert LoadCache(0, t, j, k) not in pos
        if j in shape.cache_layers:
            assert pos[op] < pos[StoreCache(0, t, j, k)]
        if j > 0:
            assert pos[StoreActivation(0, t, j - 1, k)] < pos[LoadActivation(0, t, j, k)] < pos[op]
        if j + 1 < shape.num_layers:
            assert pos[op] < pos[StoreActivation(0, t, j, k)]


def test_prefetch_overlaps_next_layer_and_next_batch():
    shape = BlockShape(num_tokens=2, num_layers=4, num_batches=2, cache_layers=frozenset({1, 2}))
    ops = block_schedule(shape)
    # layer 2's weights are requested before layer 1's first batch computes
    assert ops.index(LoadWeight(0, 0, 2)) < ops.index(Compute(0, 0, 1, 0))
    # the next token's embedding weights are requested while the head computes
    assert ops.index(LoadWeight(0, 1, 0)) < ops.index(Compute(0, 0, 3, 0))
    # batch 1's cache is requested before batch 0 computes
    assert ops.index(LoadCache(0, 1, 1, 1)) < ops.index(Compute(0, 1, 1, 0))


@pytest.mark.parametrize("shape", SHAPES[::5], ids=str)
def test_a_block_opens_before_its_state_is_used_and_closes_after(shape):
    ops = block_schedule(shape)
    opened, closed = ops.index(OpenBlock(0)), ops.index(CloseBlock(0))
    assert ops.count(OpenBlock(0)) == 1 and ops.count(CloseBlock(0)) == 1
    state_ops = [i for i, op in enumerate(ops) if not isinstance(op, (LoadWeight, FreeWeight, OpenBlock, CloseBlock))]
    assert opened < min(state_ops) and max(state_ops) < closed
    assert closed == len(ops) - 1  # nothing of the block after it closed


def test_blocks_in_sequence_never_overlap_on_one_rank():
    stage = StageShape(range(4), 2, frozenset({1, 2}))
    ops = rank_schedule(lane_tasks([3, 3], num_ranks=1), stage)
    assert ops.index(CloseBlock(0)) < ops.index(OpenBlock(1))
    # the next block's first weights are prefetched before the previous block closes
    assert ops.index(LoadWeight(1, 0, 0)) < ops.index(CloseBlock(0))


def test_ops_carry_global_layer_indices():
    stage = StageShape(range(5, 8), 1, frozenset({5, 6, 7}), rank=1, num_ranks=3)
    computes = [op for op in rank_schedule([LaneTask(0, 0), LaneTask(0, 1)], stage) if isinstance(op, Compute)]
    assert sorted({op.layer_idx for op in computes}) == [5, 6, 7]


def test_planning_and_schedule_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import flexgen_dist.planning.placement, flexgen_dist.planning.search, flexgen_dist.spec.layout\n"
        "import flexgen_dist.schedule.block, flexgen_dist.schedule.pipeline, flexgen_dist.parallel.partition\n"
        "import flexgen_dist.planning, flexgen_dist.schedule\n"
        "from flexgen_dist import Policy, ModelSpec\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_prefetch_depth_bounds_weights_in_flight():
    shape = BlockShape(num_tokens=3, num_layers=5, num_batches=2, cache_layers=frozenset({1, 2, 3}))
    for depth in (1, 2, 4):
        live, peak = set(), 0
        for op in block_schedule(shape, prefetch_depth=depth):
            if isinstance(op, LoadWeight):
                live.add(op)
                peak = max(peak, len(live))
            elif isinstance(op, FreeWeight):
                live.remove(LoadWeight(op.block_idx, op.token_idx, op.layer_idx))
        assert peak == depth + 1  # the computing layer plus `depth` layers ahead


def _compositions(total: int, parts: int):
    """Every way to split `total` decoder layers into `parts` non-empty, contiguous stages."""
    if parts == 1:
        yield (total,)
        return
    for first in range(1, total - parts + 2):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def _pipeline_stages(decoder_layers_per_rank, num_batches):
    """Global layers 0 (embedding), 1..D (decoder layers, each with a cache), D + 1 (head), split
    as given: the first rank also holds the embedding, the last the head."""
    num_ranks, num_decoder = len(decoder_layers_per_rank), sum(decoder_layers_per_rank)
    cache_layers = frozenset(range(1, num_decoder + 1))
    out, start = [], 0
    for rank, n in enumerate(decoder_layers_per_rank):
        stop = start + n + (rank == 0) + (rank == num_ranks - 1)
        out.append(StageShape(range(start, stop), num_batches, cache_layers, rank=rank, num_ranks=num_ranks))
        start = stop
    return out


# Decoder layers per rank for 1..3 decoder layers over 1..3 ranks: the middle rank of (1, 1, 1)
# holds exactly one layer, and it keeps a cache.
SPLITS = [split for d in (1, 2, 3) for p in (1, 2, 3) if p <= d for split in _compositions(d, p)]
BLOCK_TOKENS = ([1], [4], [3, 1], [1, 4, 2], [2, 2, 2])  # unequal lengths leave one lane running alone


@pytest.mark.parametrize("num_batches", [1, 2, 3])
@pytest.mark.parametrize("split", SPLITS, ids=str)
def test_every_cache_load_follows_the_store_of_the_rows_it_reads(split, num_batches):
    """Per cache (block, layer, batch) the ops run compute, store, load, compute, store, ...:
    a decode step never reads its cache before the previous step's rows are stored. And the load
    still overlaps: it is requested before the compute that precedes its own, unless that very
    compute writes the rows it reads (then right after their store)."""
    for stage, num_lanes, block_tokens, depth in itertools.product(
            _pipeline_stages(split, num_batches), (1, 2, 3), BLOCK_TOKENS, (1, 2)):
        case = (f"layers {list(stage.layers)} of split {split}, {num_batches} batches, {num_lanes} lanes, "
                f"blocks {block_tokens}, depth {depth}")
        tasks = lane_tasks(block_tokens, num_lanes)
        ops = rank_schedule(tasks, stage, depth)
        per_cache: dict[tuple, list] = {}  # (block, layer, batch) -> its ops in issue order
        for op in ops:
            if isinstance(op, (LoadCache, StoreCache, Compute)) and op.layer_idx in stage.cache_layers:
                per_cache.setdefault((op.block_idx, op.layer_idx, op.batch_idx), []).append(op)
        for (b, j, k), seen in per_cache.items():
            want = [Compute(b, 0, j, k), StoreCache(b, 0, j, k)]
            for t in range(1, block_tokens[b]):
                want += [LoadCache(b, t, j, k), Compute(b, t, j, k), StoreCache(b, t, j, k)]
            assert seen == want, f"{case}: cache of block {b}, layer {j}, batch {k} sees {seen}"
        computes = [op for op in ops if isinstance(op, Compute)]
        pos = {op: i for i, op in enumerate(ops)}
        for before, compute in zip(computes, computes[1:]):
            load = LoadCache(*dataclasses.astuple(compute))
            if load not in pos:
                continue
            if load == LoadCache(before.block_idx, before.token_idx + 1, before.layer_idx, before.batch_idx):
                store = StoreCache(*dataclasses.astuple(before))
                assert pos[load] == pos[store] + 1, f"{case}: {load} not right after its rows' store"
            else:
                assert pos[load] < pos[before], f"{case}: {load} no longer overlaps {before}"
