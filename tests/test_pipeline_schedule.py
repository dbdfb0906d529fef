"""The pipeline schedule simulated for every rank in one process: every send meets its receive,
nothing deadlocks, and the ranks really work at the same time."""

from collections import defaultdict, deque

import pytest

from flexgen_dist.schedule.block import (
    CloseBlock,
    Compute,
    LoadCache,
    OpenBlock,
    RecvControl,
    SendControl,
    RecvActivation,
    RecvTokens,
    SendActivation,
    SendTokens,
    StageShape,
    StoreCache,
    rank_schedule,
)
from flexgen_dist.schedule.block import LaneTask
from flexgen_dist.schedule.pipeline import lane_tasks, remaining_tasks


def stages(layers_per_rank, num_batches):
    """Global schedule layers per rank: layer 0 (the embedding) and the last (the head) keep no cache."""
    P = len(layers_per_rank)
    total = sum(layers_per_rank)
    out, start = [], 0
    for r, n in enumerate(layers_per_rank):
        layers = range(start, start + n)
        cache = frozenset(i for i in layers if 0 < i < total - 1)
        out.append(StageShape(layers, num_batches, cache, rank=r, num_ranks=P))
        start += n
    return out


def simulate(layers_per_rank, num_blocks, num_tokens, num_batches):
    """Discrete-event run: a compute takes one tick, messages are instant. Returns (makespan, computes).
    num_tokens: one count for every block, or a list with each block's."""
    P = len(layers_per_rank)
    block_tokens = num_tokens if isinstance(num_tokens, list) else [num_tokens] * num_blocks
    tasks = lane_tasks(block_tokens, P)
    stage_list = stages(layers_per_rank, num_batches)
    schedules = [rank_schedule(tasks, s) for s in stage_list]
    opened = [dict() for _ in range(P)]  # rank -> block -> "open" / "closed"
    peak_open = [0] * P
    channels = defaultdict(deque)  # (src, dst, kind) -> deque of ((block, token, batch), time)
    pos, clock = [0] * P, [0] * P
    received = [set() for _ in range(P)]
    stored = [set() for _ in range(P)]  # (block, token, layer, batch) whose new cache rows are stored
    computes = 0
    while True:
        progressed = False
        for r in range(P):
            ops = schedules[r]
            while pos[r] < len(ops):
                op = ops[pos[r]]
                if isinstance(op, OpenBlock):
                    assert op.block_idx not in opened[r], f"rank {r} opens block {op.block_idx} twice"
                    opened[r][op.block_idx] = "open"
                    peak_open[r] = max(peak_open[r], sum(v == "open" for v in opened[r].values()))
                elif isinstance(op, CloseBlock):
                    assert opened[r].get(op.block_idx) == "open", f"rank {r} closes block {op.block_idx} unopened"
                    opened[r][op.block_idx] = "closed"
                elif isinstance(op, (SendActivation, SendTokens, SendControl)):
                    kind = type(op).__name__[4:]
                    key = (op.block_idx, op.token_idx, op.batch_idx) if hasattr(op, "batch_idx") else (op.block_idx, op.token_idx)
                    channels[(r, op.dst, kind)].append((key, clock[r]))
                elif isinstance(op, (RecvActivation, RecvTokens, RecvControl)):
                    assert opened[r].get(op.block_idx) == "open", f"rank {r}: {op} outside its block's lifetime"
                    queue = channels[(op.src, r, type(op).__name__[4:])]
                    if not queue:
                        break  # blocked until the peer sends
                    key, sent_at = queue.popleft()
                    want = (op.block_idx, op.token_idx, op.batch_idx) if hasattr(op, "batch_idx") else (op.block_idx, op.token_idx)
                    assert key == want, f"rank {r} expected {op}, got {key}"
                    received[r].add((type(op).__name__, key))
                    clock[r] = max(clock[r], sent_at)
                elif isinstance(op, StoreCache):
                    stored[r].add((op.block_idx, op.token_idx, op.layer_idx, op.batch_idx))
                elif isinstance(op, LoadCache):
                    b, t, j, k = op.block_idx, op.token_idx, op.layer_idx, op.batch_idx
                    assert (b, t - 1, j, k) in stored[r], f"rank {r}: {op} reads rows not yet stored"
                elif isinstance(op, Compute):
                    b, t, j, k = op.block_idx, op.token_idx, op.layer_idx, op.batch_idx
                    first_layer = j == stage_list[r].layers[0]
                    assert opened[r].get(b) == "open", f"rank {r} computes {op} outside its block's lifetime"
                    if first_layer and r > 0:
                        assert ("RecvActivation", (b, t, k)) in received[r], f"rank {r} computes {op} before its input"
                        assert ("RecvControl", (b, t)) in received[r], f"rank {r} computes {op} before knowing it is live"
                    if first_layer and r == 0 and t > 0 and P > 1:
                        assert ("RecvTokens", (b, t - 1, k)) in received[r], f"rank 0 embeds {op} before its token"
                    clock[r] += 1
                    computes += 1
                pos[r] += 1
                progressed = True
        if all(pos[r] == len(schedules[r]) for r in range(P)):
            break
        assert progressed, f"deadlock: ranks stopped at {[schedules[r][pos[r]] for r in range(P) if pos[r] < len(schedules[r])]}"
    assert all(not q for q in channels.values()), "a send was never received"
    assert all(state == "closed" for r in range(P) for state in opened[r].values()), "a block was left open"
    assert all(len(opened[r]) == num_blocks for r in range(P))
    # rank 0 ends up with every sampled token of every block
    if P > 1:
        tokens = {key for kind, key in received[0] if kind == "RecvTokens"}
        assert tokens == {(b, t, k) for b in range(num_blocks) for t in range(block_tokens[b]) for k in range(num_batches)}
    # never more blocks open at once on a rank than the ranks (the blocks in flight)
    assert max(peak_open) <= P, peak_open
    return max(clock), computes


@pytest.mark.parametrize(
    "layers_per_rank, num_blocks, num_tokens, num_batches",
    [
        ([4], 3, 4, 2),
        ([3, 3], 2, 5, 1),
        ([3, 3], 5, 3, 2),  # a block count that is not a multiple of the rank count
        ([2, 4, 3], 3, 4, 3),
        ([2, 1, 1, 3], 7, 2, 2),
        ([2, 2], 1, 3, 1),  # fewer blocks than ranks
        ([2, 3], 5, [3, 1, 4, 2, 5], 2),  # blocks of different lengths: lanes start new blocks at once
        ([2, 1, 2], 1, 4, 1),  # the middle rank holds one cache layer, one GPU batch, one lane
        ([2, 1, 2], 3, [1, 5, 2], 1),  # ... and a lane left alone when the others ran out of blocks
    ],
)
def test_every_send_meets_its_receive_without_deadlock(layers_per_rank, num_blocks, num_tokens, num_batches):
    _, computes = simulate(layers_per_rank, num_blocks, num_tokens, num_batches)
    total_tokens = sum(num_tokens) if isinstance(num_tokens, list) else num_blocks * num_tokens
    assert computes == sum(layers_per_rank) * total_tokens * num_batches


@pytest.mark.parametrize("num_ranks", [2, 3, 4])
def test_ranks_work_concurrently_in_decoding(num_ranks):
    layers = [3] * num_ranks
    makespan, computes = simulate(layers, num_blocks=num_ranks, num_tokens=32, num_batches=2)
    # With P blocks in flight every stage is busy: close to 1/P of the serial time.
    assert makespan < computes / num_ranks * 1.15


def test_ranks_stay_busy_across_blocks_without_draining():
    """Many blocks through 2 ranks: with lanes the pipeline never drains between blocks, so the
    makespan stays within a few ticks of the ideal whatever the block count."""
    layers, tokens, blocks = [3, 3], 8, 10
    makespan, computes = simulate(layers, num_blocks=blocks, num_tokens=tokens, num_batches=1)
    ideal = computes / len(layers)
    assert makespan <= ideal + 2 * 3 + 1, (makespan, ideal)  # only the fill at the start and the end


def test_single_rank_runs_block_after_block():
    tasks = lane_tasks([3, 3], num_ranks=1)
    assert [t.task for t in tasks] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_lanes_take_turns_and_start_the_next_block_at_once():
    tasks = lane_tasks([2, 3, 1], num_ranks=2)
    assert [(t.block_idx, t.token_idx, t.lane) for t in tasks] == [
        (0, 0, 0), (1, 0, 1), (0, 1, 0), (1, 1, 1), (2, 0, 0), (1, 2, 1)]


def test_replanning_drops_finished_blocks_from_the_current_task_on():
    tasks = lane_tasks([3, 3], num_ranks=1)
    assert [t.task for t in remaining_tasks(tasks, {0}, (0, 1))] == [(1, 0), (1, 1), (1, 2)]
    assert [t.task for t in remaining_tasks(tasks, set(), (1, 1))] == [(1, 1), (1, 2)]
