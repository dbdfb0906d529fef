"""Prompts in, blocks out: tokenize, validate, sort by length and cut into left-padded blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import UserError
from ..spec.model import ModelSpec
from ..jobs.requests import check_text


@dataclass(frozen=True)
class PreparedPrompts:
    ids: list[list[int]]


@dataclass(frozen=True)
class BlockRows:
    input_ids: torch.Tensor  # (B, P) long, left padded
    prompt_mask: torch.Tensor  # (B, P) bool
    seq_ids: list[int]  # prompt index per row, -1 for rows that pad the last block


def prepare_prompts(prompts, tokenizer, spec: ModelSpec, max_new_tokens: int) -> PreparedPrompts:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise UserError("prompts must be a list of strings or a list of token-id lists")
    if len(prompts) == 0:
        raise UserError("the prompt list is empty: give at least one prompt")
    ids: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise UserError(f"prompt {i} is text but the model has no tokenizer; give token ids instead")
            check_text(prompt, f"prompt {i}")
            tokens = list(tokenizer(prompt)["input_ids"])
        else:
            try:
                tokens = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise UserError(f"prompt {i} is neither a string nor a list of token ids") from None
        if not tokens:
            raise UserError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in tokens if not 0 <= t < spec.vocab_size]
        if bad:
            raise UserError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {spec.vocab_size})")
        if len(tokens) + max_new_tokens > spec.max_positions:
            raise UserError(
                f"prompt {i} has {len(tokens)} tokens + {max_new_tokens} new tokens > the model's "
                f"{spec.max_positions} positions; shorten the prompt or lower max_new_tokens"
            )
        ids.append(tokens)
    return PreparedPrompts(ids)


def make_blocks(ids: list[list[int]], gpu_batch_size: int, num_gpu_batches: int, pad_id: int) -> list[BlockRows]:
    """Longest prompts first so each block pads little; the last block is filled with 1-token rows."""
    block_size = gpu_batch_size * num_gpu_batches
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    blocks = []
    for start in range(0, len(order), block_size):
        members = order[start : start + block_size]
        seq_ids = members + [-1] * (block_size - len(members))
        width = max(len(ids[i]) for i in members)
        input_ids = torch.full((block_size, width), pad_id, dtype=torch.long)
        mask = torch.zeros((block_size, width), dtype=torch.bool)
        for row, seq_id in enumerate(seq_ids):
            tokens = ids[seq_id] if seq_id >= 0 else [pad_id]
            input_ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[row, width - len(tokens) :] = True
        blocks.append(BlockRows(input_ids, mask, seq_ids))
    return blocks
