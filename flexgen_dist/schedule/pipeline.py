"""Which tasks run in which order on every rank of a pipeline (no torch).

With P ranks, blocks go through the pipeline in groups of P: within a group, for each token,
each block in turn. Rank r works on block b while rank r + 1 works on block b - 1, and by the
time the first rank needs block b's next token, the last rank has just sampled it (a ring).
One rank: one block at a time, all its tokens (the plain FlexGen loop).
"""

from __future__ import annotations

from .block import Task


def pipeline_groups(num_blocks: int, num_tokens: int, num_ranks: int) -> list[list[Task]]:
    group_size = max(1, num_ranks)
    groups = []
    for start in range(0, num_blocks, group_size):
        blocks = range(start, min(start + group_size, num_blocks))
        groups.append([(b, t) for t in range(num_tokens) for b in blocks])
    return groups


def remaining_groups(groups: list[list[Task]], done_blocks: set[int], from_task: Task) -> list[list[Task]]:
    """The groups still to run from `from_task` on, without blocks that have finished.

    Only for a single rank (no ring): it lets the engine re-plan when every sequence of a block
    has stopped early, instead of patching indices of the old plan."""
    out, started = [], False
    for group in groups:
        kept = []
        for task in group:
            started = started or task == from_task
            if started and task[0] not in done_blocks:
                kept.append(task)
        if kept:
            out.append(kept)
    return out
