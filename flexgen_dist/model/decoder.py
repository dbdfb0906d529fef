"""One decoder layer, prefill or decode, over the KV buffers the engine hands it.

The layer writes this step's keys and values into the buffers at the step's cache slots and
attends over the slots written so far, reading them in place: no concatenation of the past. The
buffers are the KV cache itself when it lives where attention runs, else a scratch copy that
the engine stores to the cache's tier afterwards; the layer does not know which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .layers import attention


@dataclass(frozen=True)
class Step:
    """What every layer of one GPU batch needs to know about the current token step."""

    positions: torch.Tensor  # (B, T) position of each query slot, counted from the first real token
    mask: torch.Tensor  # (B, 1, T, S) bool: query slot may attend key slot
    slots: slice  # cache slots of this step's queries: [0, P) in the prefill, [P + t - 1, P + t) after
    last_only: bool = True  # the head computes logits for the last slot only

    @property
    def is_prefill(self) -> bool:
        return self.slots.start == 0


@dataclass(frozen=True)
class KVBuffers:
    """Keys and values of one (layer, batch), each (S, B, nkv, hd) with room for this step's rows."""

    k: torch.Tensor
    v: torch.Tensor
    attend_on: torch.device  # where decode attention runs: the compute device, or the CPU over a host cache


class LayerMath(Protocol):
    """The per-family math (model/llama.py, model/opt.py): plain functions of loaded weights."""

    scale: float  # attention's softmax scale

    def embed(self, w: dict[str, torch.Tensor], input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) hidden states."""

    def qkv(self, w: dict[str, torch.Tensor], x: torch.Tensor, step: Step) -> tuple[torch.Tensor, ...]:
        """(B, T, C) -> q (B, nh, T, hd), k and v (B, nkv, T, hd)."""

    def finish(self, w: dict[str, torch.Tensor], x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The layer after attention: x (B, T, C) and attention output (B, T, nh * hd) -> x."""

    def head(self, w: dict[str, torch.Tensor], x: torch.Tensor, step: Step) -> torch.Tensor:
        """(B, T, C) -> fp32 logits (B, T or 1, V)."""


def decoder_layer(math: LayerMath, w: dict[str, torch.Tensor], x: torch.Tensor, step: Step, kv: KVBuffers) -> torch.Tensor:
    """x (B, T, C) -> x; this step's keys and values end up in kv at step.slots."""
    q, k_new, v_new = math.qkv(w, x, step)  # (B, nh, T, hd), (B, nkv, T, hd)
    kv.k[step.slots] = k_new.permute(2, 0, 1, 3)  # (T, B, nkv, hd): only this step's rows move
    kv.v[step.slots] = v_new.permute(2, 0, 1, 3)
    if step.is_prefill:  # no past: attend over this step's own keys, as computed
        a = attention(q, k_new, v_new, step.mask, math.scale)  # (B, T, nh * hd)
    else:
        keys = kv.k[: step.slots.stop].permute(1, 2, 0, 3)  # (B, nkv, S, hd), a view
        values = kv.v[: step.slots.stop].permute(1, 2, 0, 3)
        a = attention(q.to(kv.attend_on, keys.dtype), keys, values, step.mask.to(kv.attend_on), math.scale)
        a = a.to(x.device, x.dtype)
    return math.finish(w, x, a)
