"""Which tasks run in which order on every rank of a pipeline (no torch).

A task is one token step of one block on a rank's layers. With P ranks, P blocks are in flight
in P lanes that take turns, one task each: rank r works on one lane's task while rank r + 1 works
on the previous lane's, and by the time the first rank comes back to a lane, the last rank has
just sampled that lane's token (a ring). When a lane's block is done, the lane starts the next
block at once, while the other lanes go on decoding: the pipeline never drains between blocks.
One rank: one lane, one block after another with all its tokens (the plain FlexGen loop).
"""

from __future__ import annotations

from .block import LaneTask, Task


def lane_tasks(block_tokens: list[int], num_ranks: int) -> list[LaneTask]:
    """Every task in issue order: `min(num_ranks, blocks)` lanes take turns; each lane runs its
    blocks one after another; block b has `block_tokens[b]` token steps."""
    next_block = 0
    lanes: list[list[int] | None] = []  # per lane: [block_idx, next token_idx], None once it has no work
    for _ in range(min(max(1, num_ranks), len(block_tokens))):
        lanes.append([next_block, 0])
        next_block += 1
    out: list[LaneTask] = []
    while any(lane is not None for lane in lanes):
        for lane_idx, lane in enumerate(lanes):
            if lane is None:
                continue
            block_idx, token_idx = lane
            out.append(LaneTask(block_idx, token_idx, lane_idx))
            if token_idx + 1 < block_tokens[block_idx]:
                lane[1] += 1
            elif next_block < len(block_tokens):
                lanes[lane_idx] = [next_block, 0]
                next_block += 1
            else:
                lanes[lane_idx] = None
    return out


def remaining_tasks(tasks: list[LaneTask], done_blocks: set[int], from_task: Task) -> list[LaneTask]:
    """The tasks still to run from `from_task` on, without blocks that have finished.

    Only for a single rank (no ring): it lets the engine re-plan when every sequence of a block
    has stopped early, instead of patching indices of the old plan."""
    start = next(i for i, t in enumerate(tasks) if t.task == from_task)
    return [t for t in tasks[start:] if t.block_idx not in done_blocks]
