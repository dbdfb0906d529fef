"""A block's inputs, its state while it runs, and its results.

A block is `num_gpu_batches` x `gpu_batch_size` sequences, left padded to one width. Its state
holds, with one type per field: the tokens generated so far and which rows have stopped, the
per-step inputs of every layer (positions and attention masks), the KV cache and activation
homes opened for it (below; block_io.py opens them), and the hidden states in flight between layers.

Each row stops by its own rule (`RowRule`): its own token limit, its stop ids (EOS among them),
and its stop strings, tested by a matcher the front end hands in. The rules are evaluated from
the token ids alone when tokens are recorded, so every rank that records a block's tokens (the
last stage samples them, the first receives them) reaches the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from ..model import KVView, Step
from ..planning.placement import CachePlace, Tier
from ..storage.slots import Slot
from ..storage.tiers import DiskTensor, TierTensor, to_compute


FINISH_STOP = "stop"  # a stop id (EOS among them)
FINISH_STOP_STRING = "stop_string"  # the decoded output came to hold a stop string
FINISH_LENGTH = "length"  # the row's own max_new_tokens


class StopMatcher(Protocol):
    """One row's incremental stop-string test (the front end's; deterministic in the ids)."""

    def push(self, token_id: int) -> bool:
        """Take the next generated id; True when the output now holds a stop string."""


@dataclass(frozen=True)
class RowRule:
    """When one row stops."""

    max_new_tokens: int  # the row's own limit, <= the block's
    stop_ids: frozenset[int] = frozenset()  # ids that end the row (included in its output)
    stop_matcher: Callable[[], StopMatcher] | None = None  # makes the row's stop-string matcher


@dataclass
class Block:
    """The sequences computed together: `num_gpu_batches` x `gpu_batch_size` rows, left padded."""

    input_ids: torch.Tensor  # (B, P) long
    prompt_mask: torch.Tensor  # (B, P) bool, False on left padding
    seq_ids: list[int]  # prompt index of each row; -1 for rows that only pad the block
    max_new_tokens: int  # steps the block may run: at least every row's own limit
    stop_ids: frozenset[int]  # the rows' stop ids when `rules` is not given
    score: bool = False  # also compute each prompt token's log-probability (perplexity)
    rules: tuple[RowRule, ...] | None = None  # per row; default: max_new_tokens and stop_ids for all

    def __post_init__(self) -> None:
        rows = self.input_ids.shape[0]
        if self.rules is None:
            self.rules = (RowRule(self.max_new_tokens, frozenset(self.stop_ids)),) * rows
        if len(self.rules) != rows or len(self.seq_ids) != rows:
            raise ValueError(f"a block of {rows} rows needs {rows} seq_ids and rules, got {len(self.seq_ids)} "
                             f"and {len(self.rules)}")
        longest = max(rule.max_new_tokens for rule in self.rules)
        if longest > self.max_new_tokens or min(rule.max_new_tokens for rule in self.rules) < 1:
            raise ValueError(f"row limits must be in [1, {self.max_new_tokens}] (the block's), got up to {longest}")

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1]


@dataclass
class BlockResult:
    tokens: list[list[int]]  # per row: generated ids, up to and including the one that stopped it
    scores: list[list[float]] | None = None  # per row: log p(token i | tokens < i) for i >= 1
    finish: list[str] | None = None  # per row: FINISH_STOP, FINISH_STOP_STRING or FINISH_LENGTH


class Incoming(Protocol):
    """A hidden state on its way from the previous stage; `result()` waits and gives it on the
    compute device (engine/messages.py moves it there)."""

    def result(self) -> torch.Tensor: ...


@dataclass
class BlockState:
    block: Block
    gpu_batch_size: int
    valid: torch.Tensor  # (B, S) bool: slot holds a real token
    positions: torch.Tensor  # (B, S) long
    tokens: torch.Tensor  # (B, T) long, generated ids
    done: torch.Tensor  # (B,) bool
    caches: dict[tuple[int, int], KVCache] = field(default_factory=dict)  # (layer, batch) -> its cache
    cache_slots: dict[Tier, Slot] = field(default_factory=dict)  # the memory the block's caches live in, per tier
    cache_views: dict[str, torch.Tensor] = field(default_factory=dict)  # piece name -> its tensor in a slot
    acts: dict[int, ActivationHome] = field(default_factory=dict)  # batch -> where its hidden state waits
    scratch_dir: Path | None = None  # this block's disk-tier cache and activation files
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # batch -> hidden state on the device
    incoming: dict[int, Incoming] = field(default_factory=dict)  # batch -> pending receive of its input
    leases: dict[tuple[int, int], KVLease] = field(default_factory=dict)  # (layer, batch) -> buffers in use
    scores: dict[int, list[float]] = field(default_factory=dict)  # row -> prompt token log-probs
    steps: dict[tuple[int, int], Step] = field(default_factory=dict)  # (token, batch) -> step inputs
    lengths: list[int] = field(default_factory=list)  # row -> tokens it generated before it stopped
    finish: list[str | None] = field(default_factory=list)  # row -> why it stopped (None: running)
    matchers: list[StopMatcher | None] = field(default_factory=list)  # row -> its stop-string matcher
    steps_run: int = 0  # token steps whose tokens were recorded: every row computed in each
    refill_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # batch -> new prompts' hidden state (refill.py)
    refill_acts: dict[int, ActivationHome] = field(default_factory=dict)  # batch -> where that waits between layers
    refill_incoming: dict[int, Incoming] = field(default_factory=dict)  # batch -> new prompts' input from the previous stage
    refill_waiting: dict[int, int] = field(default_factory=dict)  # batch -> rows of new prompts whose hidden state is in its home

    @classmethod
    def start(cls, block: Block, gpu_batch_size: int) -> "BlockState":
        B, P = block.input_ids.shape
        valid = torch.ones(B, P + block.max_new_tokens, dtype=torch.bool)
        valid[:, :P] = block.prompt_mask
        # A row that reached its own limit keeps computing (ignored) until the block ends; its
        # positions stop at its last real one, so they never run past the model's positions.
        limits = torch.tensor([rule.max_new_tokens for rule in block.rules], dtype=torch.long)
        last_position = block.prompt_mask.sum(dim=1) + limits - 1  # (B,)
        positions = torch.minimum((valid.long().cumsum(-1) - 1).clamp(min=0), last_position[:, None])
        return cls(
            block=block,
            gpu_batch_size=gpu_batch_size,
            valid=valid,
            positions=positions,
            tokens=torch.zeros(B, block.max_new_tokens, dtype=torch.long),
            done=torch.tensor([seq_id < 0 for seq_id in block.seq_ids], dtype=torch.bool),
            lengths=[0] * B,
            finish=[None] * B,
            matchers=[rule.stop_matcher() if rule.stop_matcher is not None and seq_id >= 0 else None
                      for rule, seq_id in zip(block.rules, block.seq_ids)],
        )

    def rows(self, batch_idx: int) -> slice:
        return slice(batch_idx * self.gpu_batch_size, (batch_idx + 1) * self.gpu_batch_size)

    def query_slots(self, token_idx: int) -> slice:
        P = self.block.prompt_len
        return slice(0, P) if token_idx == 0 else slice(P + token_idx - 1, P + token_idx)

    def refill_rows(self, token_idx: int, batch_idx: int):
        """Rows of the batch whose new prompts run their prefill at this step (refill.py); none here."""
        return None

    def may_run(self, token_idx: int) -> bool:
        """Whether the block has a step `token_idx` (a refilled block runs while prompts wait)."""
        return token_idx < self.block.max_new_tokens

    def sampled(self, token_idx: int, batch_idx: int) -> torch.Tensor:
        """The ids one GPU batch sampled at a step (the last rank sends them to the first)."""
        return self.tokens[self.rows(batch_idx), token_idx].clone()

    def past_slots(self, token_idx: int) -> slice:
        """The cache slots a decode step reads besides its own (what a load brings into scratch)."""
        return slice(0, self.query_slots(token_idx).start)

    def written_slots(self, token_idx: int, batch_idx: int) -> list[slice]:
        """The cache slots a step of one GPU batch writes (what a store takes from scratch)."""
        return [self.query_slots(token_idx)]

    def step(self, token_idx: int, batch_idx: int, device: torch.device, sliding_window: int | None,
             local_window: int | None = None) -> Step:
        """Positions and attention masks of one GPU batch at one token step (built once): the
        mask of every layer (sliding_window: a window for all of them), and with local_window
        the mask of the layers that look back that far only (Gemma 3's local layers)."""
        key = (token_idx, batch_idx)
        if key not in self.steps:
            rows, q = self.rows(batch_idx), self.query_slots(token_idx)
            q_idx = torch.arange(q.start, q.stop)[:, None]  # (T, 1)
            k_idx = torch.arange(0, q.stop)[None, :]  # (1, S)

            def mask_of(window: int | None) -> torch.Tensor:
                allowed = k_idx <= q_idx
                if window:
                    allowed &= (q_idx - k_idx) < window
                mask = self.valid[rows, None, None, : q.stop] & allowed  # (B, 1, T, S)
                mask |= k_idx == q_idx  # a padding slot attends to itself: no fully masked row, no NaN
                return mask.to(device)

            self.steps[key] = Step(
                positions=self.positions[rows, q].to(device),
                mask=mask_of(sliding_window),
                slots=q,
                last_only=not (self.block.score and token_idx == 0),
                local_mask=mask_of(local_window) if local_window else None,
            )
        return self.steps[key]

    def forget_step(self, token_idx: int, batch_idx: int) -> None:
        self.steps.pop((token_idx, batch_idx), None)

    def input_ids(self, token_idx: int, batch_idx: int) -> torch.Tensor:
        """What the embedding reads: the prompt in the prefill, then the previous token."""
        rows = self.rows(batch_idx)
        return self.block.input_ids[rows] if token_idx == 0 else self.tokens[rows, token_idx - 1 : token_idx]

    def record_tokens(self, token_idx: int, batch_idx: int, ids: torch.Tensor) -> None:
        """Sampled ids (B,) of a batch; a stopped row keeps emitting 0, which the result drops.
        Each running row then stops at a stop id, a stop string or its own limit."""
        rows = self.rows(batch_idx)
        done = self.done[rows]
        if not bool(done.all()):  # a dead task's (empty) tokens are not a step the block ran
            self.steps_run = max(self.steps_run, token_idx + 1)
        ids = ids.to(done.device)
        ids = torch.where(done, torch.zeros_like(ids), ids)
        self.tokens[rows, token_idx] = ids
        for row, token, stopped in zip(range(rows.start, rows.stop), ids.tolist(), done.tolist()):
            if stopped:
                continue
            rule, matcher = self.block.rules[row], self.matchers[row]
            self.lengths[row] = token_idx + 1
            if token in rule.stop_ids:
                self.finish[row] = FINISH_STOP
            elif matcher is not None and matcher.push(token):
                self.finish[row] = FINISH_STOP_STRING
            elif token_idx + 1 >= rule.max_new_tokens:
                self.finish[row] = FINISH_LENGTH
            if self.finish[row] is not None:
                self.done[row] = True

    def record_scores(self, batch_idx: int, logits: torch.Tensor) -> None:
        """Log-probabilities of each prompt token given those before it, from the prefill's logits."""
        rows = self.rows(batch_idx)
        ids = self.block.input_ids[rows].to(logits.device)  # (B, P)
        mask = self.block.prompt_mask[rows]
        for i in range(logits.shape[0]):  # row by row: a (P, V) log-softmax at a time
            logp = logits[i, :-1].log_softmax(-1).gather(-1, ids[i, 1:, None])[:, 0].cpu()  # (P - 1,)
            both_real = mask[i, :-1] & mask[i, 1:]
            self.scores[rows.start + i] = logp[both_real].tolist()

    def result(self) -> BlockResult:
        rows = range(self.tokens.shape[0])
        tokens = [self.tokens[row, : self.lengths[row]].tolist() for row in rows]
        scores = [self.scores[row] for row in rows] if self.block.score else None
        finish = [reason or FINISH_LENGTH for reason in self.finish]
        return BlockResult(tokens, scores, finish)


# --- Where one block's KV caches and activations live while it is open, and what a compute
# borrows: `BlockIO` (block_io.py) makes these when a block opens and `BlockState` holds them.

@dataclass
class KVCache:
    """Keys and values of one (layer, batch) of one block, each (S, B, nkv, hd), on their tiers."""

    k: TierTensor
    v: TierTensor
    place: CachePlace
    written: object = None  # an event after the last store (a device-to-host copy may still run)


@dataclass(frozen=True)
class KVLease:
    """The KV view handed to one compute. From scratch: the pool slot behind it and its keys and
    values buffers (which `store_cache` writes to the tier); in place: none of these."""

    view: KVView
    scratch: Slot | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


class ActivationHome:
    """Where one GPU batch's hidden state waits between two layers: kept as it is (the compute
    device's memory), moved to host memory (cpu tier beside a GPU), or written to a file."""

    def __init__(self, tier: Tier, device: torch.device, dtype: torch.dtype, file: DiskTensor | None = None):
        self.tier, self.device, self.dtype, self.file = tier, device, dtype, file
        self._held: torch.Tensor | None = None
        self._length = 0

    def store(self, x: torch.Tensor) -> None:  # x: (B, T, C)
        if self.file is not None:
            self.file.write(slice(0, x.shape[1]), x.transpose(0, 1))  # (T, B, C)
            self._length = x.shape[1]
        elif self.tier is Tier.CPU and self.device.type != "cpu":
            self._held = x.to("cpu", non_blocking=True)
        else:
            self._held = x

    def load(self) -> torch.Tensor:
        if self.file is not None:
            return to_compute(self.file, slice(0, self._length), self.device, self.dtype).transpose(0, 1)
        x, self._held = self._held, None
        return x.to(self.device, non_blocking=True)
