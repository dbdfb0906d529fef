"""What one `Engine.run` tracks while it walks the plan (`Walk`), the stretches of steps a refill
run plans for its open blocks (`Walk.refill_plan`), and what the run returns (`RunResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..schedule import block as ops
from ..schedule.pipeline import LaneTask
from .blocks import Block, BlockResult, BlockState
from .finite import FiniteWatch
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
