"""Choosing the next token: greedy, or temperature / top-k / top-p sampling.

Each sequence has its own generator seeded from (seed, prompt index), so a sampled output does
not depend on which block or batch the prompt landed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


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
    def __init__(self, params: SamplingParams):
        self.params = params
        self._generators: dict[int, torch.Generator] = {}

    def _generator(self, seq_id: int) -> torch.Generator:
        if seq_id not in self._generators:
            self._generators[seq_id] = torch.Generator().manual_seed(self.params.seed * 1_000_003 + seq_id)
        return self._generators[seq_id]

    def __call__(self, logits: torch.Tensor, seq_ids: list[int]) -> torch.Tensor:
        """logits (B, V) fp32 -> next token ids (B,) on the CPU; seq_ids name each row's prompt."""
        if not self.params.do_sample:
            return logits.argmax(dim=-1).cpu()
        p = self.params
        out = torch.empty(len(seq_ids), dtype=torch.long)
        for row, seq_id in enumerate(seq_ids):
            filtered = _filter(logits[row].float().cpu() / p.temperature, p.top_k, p.top_p)
            out[row] = torch.multinomial(filtered.softmax(-1), 1, generator=self._generator(seq_id))[0]
        return out
