"""Which tasks run in which order on every rank of a pipeline (no torch).

A task is one token step of one block on a rank's layers. With P ranks, P blocks are in flight
in P lanes that take turns, one task each: rank r works on one lane's task while rank r + 1 works
on the previous lane's, and by the time the first rank comes back to a lane, the last rank has
just sampled that lane's token (a ring). When a lane's block is done, the lane starts the next
block at once, while the other lanes go on decoding: the pipeline never drains between blocks.
One rank: one lane, one block after another with all its tokens (the plain FlexGen loop).
"""

from __future__ import annotations

from dataclasses import dataclass

Task = tuple[int, int]  # (block_idx, token_idx)


@dataclass(frozen=True)
class LaneTask:
    """A task and the pipeline lane it runs in (schedule/pipeline.py)."""

    block_idx: int
    token_idx: int
    lane: int = 0

    @property
    def task(self) -> Task:
        return (self.block_idx, self.token_idx)



def token_receives(tasks: list[LaneTask]) -> tuple[dict[int, int], dict[int, list[int]]]:
    """When the first stage receives the tokens the last stage sampled in each task.

    The last stage sends them in task order, and receives match sends in the order they are
    posted, so the first stage must post its receives in task order too. A task's tokens are
    needed by its block's next task; a block's final tokens are needed by nobody, and are received
    just before its lane's next task (so the block closes before the lane's next block opens), or
    at the end. Moving a receive earlier than that only waits longer, never wrongly, so a backward
    pass makes the positions non-decreasing in task order.
    Returns ({task index: index of the task that consumes it}, {task index: receives posted at its
    start, in task order}); position len(tasks) means after the last task."""
    n = len(tasks)
    next_of_block: dict[int, int] = {}
    consumer: dict[int, int] = {}
    want = [n] * n
    for i in range(n - 1, -1, -1):
        block = tasks[i].block_idx
        if block in next_of_block:
            consumer[i] = want[i] = next_of_block[block]
        next_of_block[block] = i
    next_in_lane: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        if i not in consumer and tasks[i].lane in next_in_lane:
            want[i] = next_in_lane[tasks[i].lane]
        next_in_lane[tasks[i].lane] = i
    for i in range(n - 2, -1, -1):
        want[i] = min(want[i], want[i + 1])
    early: dict[int, list[int]] = {}
    for i in range(n):
        if consumer.get(i) != want[i]:  # not received right before its consumer's compute
            early.setdefault(want[i], []).append(i)
    return {i: c for i, c in consumer.items() if want[i] == c}, early


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
