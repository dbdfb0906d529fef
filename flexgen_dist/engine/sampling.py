"""Choosing the next token: greedy, or temperature / top-k / top-p sampling, per sequence.

Each sampled sequence has its own generator, seeded from (seed, stream), where the stream is a
number that belongs to the sequence itself: the prompt's index in `LLM.generate`, the request's
index in its job file for a job. So a sampled output depends neither on the block or batch the
prompt landed in, nor on which other prompts ran (a resumed run, a shard), and greedy and
sampled sequences may share a block.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import UserError

STREAM_STRIDE = 1_000_003  # seed * STREAM_STRIDE + stream: distinct seeds for nearby (seed, stream)
SEED_SPACE = 2**64  # torch.Generator.manual_seed takes values below this


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UserError(f"temperature must be a finite number > 0, got {self.temperature}; use do_sample=False for greedy")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class RowSampling:
    """How one sequence picks its tokens."""

    params: SamplingParams
    stream: int  # the sequence's own number (never its place in a block): its generator's seed

    @property
    def generator_seed(self) -> int:
        return (self.params.seed * STREAM_STRIDE + self.stream) % SEED_SPACE


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits (V,) with the tokens outside top-k / top-p set to -inf (as transformers' warpers)."""
    if top_k > 0:
        k = min(top_k, logits.numel())
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[-1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


class Sampler:
    """params: for every sequence not in `rows` (its stream is its seq_id, the prompt index);
    rows: seq_id -> that sequence's own settings."""

    def __init__(self, params: SamplingParams | None = None, rows: Mapping[int, RowSampling] | None = None):
        self.params = params or SamplingParams()
        self.rows = dict(rows or {})
        self._generators: dict[int, torch.Generator] = {}

    def row(self, seq_id: int) -> RowSampling:
        found = self.rows.get(seq_id)
        return found if found is not None else RowSampling(self.params, stream=seq_id)

    def _generator(self, seq_id: int, row: RowSampling) -> torch.Generator:
        if seq_id not in self._generators:
            self._generators[seq_id] = torch.Generator().manual_seed(row.generator_seed)
        return self._generators[seq_id]

    def __call__(self, logits: torch.Tensor, seq_ids: list[int]) -> torch.Tensor:
        """logits (B, V) fp32 -> next token ids (B,) on the CPU; seq_ids name each row's sequence
        (-1 for a row that only pads the block: it gets the greedy token, which is dropped)."""
        sampled = [(row_idx, seq_id, self.row(seq_id)) for row_idx, seq_id in enumerate(seq_ids)
                   if seq_id >= 0 and self.row(seq_id).params.do_sample]
        out = logits.argmax(dim=-1).cpu()  # the one wait for the device of a greedy batch
        if not sampled:
            return out
        # the sampled rows come over in one copy (the argmax above already waited), not one per row
        rows = logits[[row_idx for row_idx, _, _ in sampled]].float().cpu()  # (n, V)
        for host_row, (row_idx, seq_id, row) in zip(rows, sampled):
            p = row.params
            filtered = _filter(host_row / p.temperature, p.top_k, p.top_p)
            out[row_idx] = torch.multinomial(filtered.softmax(-1), 1, generator=self._generator(seq_id, row))[0]
        return out


class TeacherForcing:
    """A 'sampler' that feeds each sequence its own next token and records that token's
    log-probability: scoring a text one decode step at a time, so every step reads the KV cache
    as generation does (where its compression, 16-bit storage or sparse attention show)."""

    def __init__(self, targets: Mapping[int, list[int]]):
        self.targets = {seq_id: list(ids) for seq_id, ids in targets.items()}
        self.scores: dict[int, list[float]] = {seq_id: [] for seq_id in self.targets}

    def __call__(self, logits: torch.Tensor, seq_ids: list[int]) -> torch.Tensor:
        """logits (B, V) fp32 -> the forced ids (B,); padding rows (seq_id < 0) get 0."""
        logp = logits.float().log_softmax(-1).cpu()
        out = torch.zeros(len(seq_ids), dtype=torch.long)
        for row, seq_id in enumerate(seq_ids):
            done = self.scores.get(seq_id)
            if done is None or len(done) >= len(self.targets[seq_id]):
                continue  # padding, or a row past its own text
            target = self.targets[seq_id][len(done)]
            done.append(float(logp[row, target]))
            out[row] = target
        return out
