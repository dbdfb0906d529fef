"""Continuous refill: a row whose sequence finished takes the next waiting prompt inside its block.

FlexGen's block runs until its longest row ends: rows that stopped early keep their place and
compute nothing of use, while every step still loads each layer for the whole block. Here, when
a row finishes (a stop id, a stop string, its own limit), the next waiting prompt (the rows of
the blocks after the first, in order) takes that row at the next step. Its prefill runs in the
same layer pass as the other rows' decode step, its tokens beside theirs in every matmul
(model/decoder.py `mixed_decoder_layer`: on a CPU a small matmul costs mostly its pass over the
weights, paid once so), and its keys and values go where the finished sequence's were: one block stays open, its cache is reused, and each step still loads each
layer once for every row.

A block of width W (its widest prompt) and limit M has S = W + M cache slots per row. Step t >= 1
writes slot (W + t - 1) mod S for every row: the slots go round a ring, so a block runs as many
steps as its prompts need. A sequence spans at most W + M - 1 consecutive slots, so it never
overwrites itself; a new prompt of L tokens takes the L slots ending at the current one, which
the finished sequence no longer needs. Which slots hold a row's tokens (`valid`) and their
positions are kept per row: a decode step attends over its row's valid slots (keys attend alike
in any order, their positions are in them already), the sliding window counted in positions.

Each sequence samples from its own generator (engine/sampling.py), so its tokens do not depend on
the row or step that served it. (A KIVI cache, storage/kivi.py, quantizes keys in groups of the
ring's slots, which every row completes at the same step; where a sequence's positions fall in
those groups depends on its row and step, so with it a sequence's tokens may too, within the
4 bits' tolerance.) A block that lent its prompts gets its results when its last
sequence finishes (`Lender.finished`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model import Step
from .kv_views import slot_runs
from .blocks import FINISH_LENGTH, FINISH_STOP, FINISH_STOP_STRING, Block, BlockResult, BlockState, RowRule


@dataclass(frozen=True)
class Waiting:
    """A prompt waiting for a row: where its result goes, and what it is."""

    origin: tuple[int, int]  # (block index, row) of the block it came from
    seq_id: int
    ids: torch.Tensor  # (L,) its prompt's real ids
    rule: RowRule


@dataclass(frozen=True)
class RefillRows:
    """The rows of one GPU batch whose new prompts run their prefill at one step."""

    rows: torch.Tensor  # (R,) rows within the batch
    slots: torch.Tensor  # (L,) the cache slots of the prompts, in order
    ids: torch.Tensor  # (R, L) the prompts, left padded
    step: Step  # their prefill's positions and mask


class Lender:
    """The prompts of the blocks after the first `lanes` (the blocks that stay open: one per
    pipeline lane), waiting for a row, and the results of every block, delivered
    (`on_block_done(block_idx, result)`) when its last sequence finishes."""

    def __init__(self, blocks: list[Block], lanes: int, on_block_done: Callable[[int, BlockResult], None] | None):
        self.blocks = blocks
        self.lanes = lanes
        self.on_block_done = on_block_done
        self.waiting: deque[Waiting] = deque(
            Waiting((b, row), seq_id, block.input_ids[row][block.prompt_mask[row]], block.rules[row])
            for b, block in enumerate(blocks) if b >= lanes
            for row, seq_id in enumerate(block.seq_ids) if seq_id >= 0)
        self.tokens = [[[] for _ in block.seq_ids] for block in blocks]
        self.finish = [[FINISH_LENGTH] * len(block.seq_ids) for block in blocks]
        self.left = [sum(seq_id >= 0 for seq_id in block.seq_ids) for block in blocks]
        self.results: dict[int, BlockResult] = {}

    def open_block(self, lane: int) -> Block:
        """Block `lane`, as wide as the widest prompt and as long as the longest limit."""
        first = self.blocks[lane]
        width = max(block.prompt_len for block in self.blocks)
        steps = max(block.max_new_tokens for block in self.blocks)
        pad = width - first.prompt_len
        ids = torch.nn.functional.pad(first.input_ids, (pad, 0))
        mask = torch.nn.functional.pad(first.prompt_mask, (pad, 0))
        return Block(ids, mask, list(first.seq_ids), steps, frozenset(), rules=first.rules)

    def finished(self, origin: tuple[int, int], tokens: list[int], why: str) -> None:
        b, row = origin
        self.tokens[b][row], self.finish[b][row] = tokens, why
        self.left[b] -= 1
        if self.left[b] == 0:
            self.results[b] = result = BlockResult(self.tokens[b], None, self.finish[b])
            if self.on_block_done is not None:
                self.on_block_done(b, result)


@dataclass
class RefillState(BlockState):
    """A block's state whose rows take new prompts (`Lender.open_block` made its block).

    In a pipeline the first rank (which records every sampled token) and the last (which samples
    them) decide alike which rows end and which waiting prompt each takes; the ranks between learn
    which rows start a prompt from the control message before each task (`start_rows`), and take
    the same prompts from their own copy of the queue."""

    lender: Lender | None = None
    origin: list[tuple[int, int] | None] = field(default_factory=list)  # row -> (block, row) of its sequence
    rules_now: list[RowRule] = field(default_factory=list)  # row -> its sequence's rule
    generated: list[list[int]] = field(default_factory=list)  # row -> its sequence's tokens so far
    last: torch.Tensor | None = None  # (B,) the token each row reads next
    next_pos: torch.Tensor | None = None  # (B,) that token's position
    starting: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)  # row -> (step, prompt ids)
    refills: dict[tuple[int, int], RefillRows] = field(default_factory=dict)  # (step, batch) -> its new prompts

    @classmethod
    def open(cls, lender: Lender, lane: int) -> Callable[[Block, int], "RefillState"]:
        """A `start(block, gpu_batch_size)` for BlockIO.open of lane `lane`'s block."""
        def start(block: Block, gpu_batch_size: int) -> RefillState:
            base = BlockState.start(block, gpu_batch_size)
            rows, width = block.input_ids.shape
            base.valid[:, width:] = False  # a slot is valid once a token of the row's sequence is in it
            fields = {name: getattr(base, name) for name in BlockState.__dataclass_fields__}
            return cls(**fields, lender=lender,
                       origin=[(lane, row) if seq_id >= 0 else None for row, seq_id in enumerate(block.seq_ids)],
                       rules_now=list(block.rules), generated=[[] for _ in range(rows)],
                       last=torch.zeros(rows, dtype=torch.long), next_pos=block.prompt_mask.sum(dim=1))
        return start

    @property
    def width(self) -> int:
        return self.block.prompt_len

    @property
    def num_slots(self) -> int:
        return self.valid.shape[1]

    def _slot(self, token_idx: int) -> int:
        return (self.width + token_idx - 1) % self.num_slots

    def query_slots(self, token_idx: int) -> slice:
        if token_idx == 0:
            return slice(0, self.width)
        slot = self._slot(token_idx)
        return slice(slot, slot + 1)

    def past_slots(self, token_idx: int) -> slice:
        return slice(0, min(self.num_slots, self.width + token_idx - 1))

    def written_slots(self, token_idx: int, batch_idx: int) -> list[slice]:
        own = [self.query_slots(token_idx)]
        refill = self.refills.get((token_idx, batch_idx))
        if refill is None:
            return own
        return own + [slice(start, stop) for start, stop, _ in slot_runs(refill.slots)]

    def refill_rows(self, token_idx: int, batch_idx: int) -> RefillRows | None:
        return self.refills.get((token_idx, batch_idx))

    def step(self, token_idx: int, batch_idx: int, device: torch.device, sliding_window: int | None,
             local_window: int | None = None) -> Step:
        key = (token_idx, batch_idx)
        if token_idx == 0 or key in self.steps:
            return super().step(token_idx, batch_idx, device, sliding_window, local_window)
        rows, slot = self.rows(batch_idx), self._slot(token_idx)
        stop = min(self.num_slots, self.width + token_idx)
        row_ids = list(range(rows.start, rows.stop))
        starting = torch.tensor([self.starting.get(r, (-1,))[0] == token_idx for r in row_ids])
        decoding = ~self.done[rows] & ~starting
        pos = self.next_pos[rows].clone()
        self.valid[rows, slot] = decoding
        self.positions[rows, slot] = pos
        self.next_pos[rows] += decoding.long()
        mask = self.valid[rows, None, None, :stop].clone()  # (B, 1, 1, stop)
        mask[..., slot] = True  # a row not decoding (stopped, or starting a prompt) attends to itself: no NaN
        back = pos[:, None, None, None] - self.positions[rows, None, None, :stop]  # how far back each slot is

        def mask_of(window: int | None) -> torch.Tensor:
            return (mask & (back < window) if window else mask).to(device)

        self.steps[key] = Step(positions=pos[:, None].to(device), mask=mask_of(sliding_window),
                               slots=slice(slot, slot + 1), decode_stop=stop,
                               local_mask=mask_of(local_window) if local_window else None)
        if bool(starting.any()):
            self._start_prompts(key, torch.tensor(row_ids)[starting], slot, device, sliding_window, local_window)
        return self.steps[key]

    def _start_prompts(self, key: tuple[int, int], rows: torch.Tensor, slot: int, device: torch.device,
                       sliding_window: int | None, local_window: int | None) -> None:
        """The prefill inputs of the prompts that take `rows` (block rows) at this step: their
        slots are the L ending at this step's, L their longest prompt."""
        prompts = [self.starting[row][1] for row in rows.tolist()]
        length = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        real = torch.zeros(len(prompts), length, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            ids[i, length - len(prompt):] = prompt
            real[i, length - len(prompt):] = True
        slots = torch.arange(slot - length + 1, slot + 1) % self.num_slots
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        self.valid[rows] = False  # the finished sequence's slots are free
        self.valid[rows[:, None], slots[None, :]] = real
        self.positions[rows[:, None], slots[None, :]] = positions
        self.next_pos[rows] = real.sum(dim=1)
        q = torch.arange(length)

        def mask_of(window: int | None) -> torch.Tensor:
            allowed = q[None, :] <= q[:, None]  # (L, L): query i may attend key j
            if window:
                allowed &= (q[:, None] - q[None, :]) < window
            return ((real[:, None, None, :] & allowed) | torch.eye(length, dtype=torch.bool)).to(device)  # padding: itself

        step = Step(positions=positions.to(device), mask=mask_of(sliding_window), slots=slice(0, length),
                    local_mask=mask_of(local_window) if local_window else None)
        self.refills[key] = RefillRows(rows=rows - key[1] * self.gpu_batch_size, slots=slots, ids=ids, step=step)

    def starts_at(self, token_idx: int) -> list[int]:
        """Rows that start a new prompt at this step."""
        return [row for row, (at, _) in sorted(self.starting.items()) if at == token_idx]

    def start_rows(self, token_idx: int, rows: list[int]) -> None:
        """A rank that does not record tokens: these rows start the next waiting prompts now."""
        for row in rows:
            self._take(row, token_idx)

    def refill_shape(self, token_idx: int, batch_idx: int, hidden_size: int) -> tuple[int, int, int] | None:
        """(R, L, C) of the new prompts' hidden state of one GPU batch at this step, if any."""
        batch = self.rows(batch_idx)
        lengths = [len(self.starting[row][1]) for row in self.starts_at(token_idx) if batch.start <= row < batch.stop]
        return (len(lengths), max(lengths), hidden_size) if lengths else None

    def may_run(self, token_idx: int) -> bool:
        return True  # as long as prompts wait or rows run

    def sampled(self, token_idx: int, batch_idx: int) -> torch.Tensor:
        return self.last[self.rows(batch_idx)].clone()

    def forget_step(self, token_idx: int, batch_idx: int) -> None:
        """The step's inputs are used up; its new prompts' slots are kept one step longer: the
        store of the stage's last layer, after its compute, still writes them (a pipeline's first
        stage ends on a layer with a cache)."""
        super().forget_step(token_idx, batch_idx)
        self.refills.pop((token_idx - 1, batch_idx), None)

    def input_ids(self, token_idx: int, batch_idx: int) -> torch.Tensor:
        if token_idx == 0:
            return super().input_ids(token_idx, batch_idx)
        return self.last[self.rows(batch_idx), None]

    def record_tokens(self, token_idx: int, batch_idx: int, ids: torch.Tensor) -> None:
        """Each running row's token; a row whose sequence ends hands its result to the lender and
        takes the next waiting prompt, whose prefill runs at the next step."""
        rows = self.rows(batch_idx)
        if not bool(self.done[rows].all()):  # a dead task's (empty) tokens are not a step the block ran
            self.steps_run = max(self.steps_run, token_idx + 1)
        for row, token in zip(range(rows.start, rows.stop), ids.tolist()):
            if self.done[row]:
                continue
            self.last[row] = token
            tokens, rule, matcher = self.generated[row], self.rules_now[row], self.matchers[row]
            tokens.append(token)
            why = (FINISH_STOP if token in rule.stop_ids
                   else FINISH_STOP_STRING if matcher is not None and matcher.push(token)
                   else FINISH_LENGTH if len(tokens) >= rule.max_new_tokens else None)
            if why is not None:
                self.done[row] = True
                self.lender.finished(self.origin[row], tokens, why)
        for row in range(rows.start, rows.stop):
            if self.done[row] and self.lender.waiting:
                self._take(row, token_idx + 1)

    def _take(self, row: int, token_idx: int) -> None:
        waiting = self.lender.waiting.popleft()
        self.origin[row], self.rules_now[row], self.generated[row] = waiting.origin, waiting.rule, []
        self.block.seq_ids[row] = waiting.seq_id  # the sampler's stream for the row
        self.matchers[row] = waiting.rule.stop_matcher() if waiting.rule.stop_matcher is not None else None
        self.starting[row] = (token_idx, waiting.ids)
        self.done[row] = False

    def result(self) -> BlockResult:
        return BlockResult([])  # every block's results went through the lender
