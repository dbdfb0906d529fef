"""One decoder layer, prefill or decode, over the KV cache view the engine hands it.

The layer writes this step's keys and values into the view at the step's cache slots and, in
decoding, attends over the slots written so far, read in place: no concatenation of the past.
The view is the KV cache itself when it lives where attention runs, else a scratch copy that the
engine stores to the cache's tier afterwards; it may convert or dequantize as it is read
(engine/kv_views.py). The layer does not know which.
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
    # A decode step whose keys lie anywhere in [0, decode_stop), not only before its slot: a block
    # whose rows take new prompts (engine/refill.py) writes its cache round a ring of slots.
    decode_stop: int | None = None
    local_mask: torch.Tensor | None = None  # the mask of layers with a window of their own (LayerMath.local)

    @property
    def is_prefill(self) -> bool:
        return self.slots.start == 0 and self.decode_stop is None

    def mask_for(self, math: "LayerMath") -> torch.Tensor:
        """The mask of the layer `math` computes: a local layer's window, or every layer's mask."""
        return self.local_mask if math.local else self.mask

    @property
    def reads(self) -> slice:
        """The cache slots a decode step attends over (the mask says which of them it may)."""
        return slice(self.slots.start, self.decode_stop or self.slots.stop)


class KVView(Protocol):
    """One (layer, batch) KV cache as a layer sees it (engine/kv_views.py implements it)."""

    def write(self, slots: slice, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """This step's keys and values, (B, nkv, T, hd), into cache slots `slots`."""

    def attend(self, q: torch.Tensor, mask: torch.Tensor, scale: float, slots: slice) -> torch.Tensor:
        """Decode attention of q (B, nh, T, hd) over slots [0, slots.stop) -> (B, T, nh * hd)."""

    def write_rows(self, rows: torch.Tensor, slots: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Keys and values (R, nkv, T, hd) of some rows of the batch (`rows`, R of them) into the
        cache slots `slots` (T of them, anywhere): a prompt taking the row of a finished one."""


class LayerMath(Protocol):
    """The per-family math (model/llama.py, model/opt.py): plain functions of loaded weights."""

    scale: float  # attention's softmax scale
    local: bool  # this layer attends within Step.local_mask's window (Gemma 3's local layers)

    def at(self, layer: int) -> "LayerMath":
        """The math of decoder layer `layer` (0-based): itself, or one bound to that layer's
        attention (Gemma 3: its own rope base and window on local layers)."""

    def embed(self, w: dict[str, torch.Tensor], input_ids: torch.Tensor, step: Step) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) hidden states."""

    def qkv(self, w: dict[str, torch.Tensor], x: torch.Tensor, step: Step) -> tuple[torch.Tensor, ...]:
        """(B, T, C) -> q (B, nh, T, hd), k and v (B, nkv, T, hd)."""

    def finish(self, w: dict[str, torch.Tensor], x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The layer after attention: x (B, T, C) and attention output (B, T, nh * hd) -> x."""

    def head(self, w: dict[str, torch.Tensor], x: torch.Tensor, step: Step) -> torch.Tensor:
        """(B, T, C) -> fp32 logits (B, T or 1, V)."""


def decoder_layer(math: LayerMath, w: dict[str, torch.Tensor], x: torch.Tensor, step: Step, kv: KVView) -> torch.Tensor:
    """x (B, T, C) -> x; this step's keys and values end up in kv at step.slots."""
    q, k_new, v_new = math.qkv(w, x, step)  # (B, nh, T, hd), (B, nkv, T, hd)
    kv.write(step.slots, k_new, v_new)
    if step.is_prefill:  # no past: attend over this step's own keys, as computed
        a = attention(q, k_new, v_new, step.mask_for(math), math.scale)  # (B, T, nh * hd)
    else:
        a = kv.attend(q, step.mask_for(math), math.scale, step.reads).to(x.device, x.dtype)
    return math.finish(w, x, a)


def mixed_decoder_layer(math: LayerMath, w: dict[str, torch.Tensor], x: torch.Tensor, step: Step, kv: KVView,
                        started: torch.Tensor, started_step: Step, rows: torch.Tensor,
                        slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's decode step, x (B, 1, C), and the prefill of the prompts that started in some of
    its rows, started (R, L, C), as one pass: their tokens side by side, (1, B + R * L, C), through
    every matmul (a CPU's small matmuls cost mostly the pass over the weights, paid once here), and
    apart in attention: the batch's decode over its cache, the prompts' over their own keys, which
    go to `slots` of `rows` after the decode step's write to those rows. -> (x, started)."""
    B, R, L = x.shape[0], started.shape[0], started.shape[1]
    both = torch.cat([x.reshape(1, B, -1), started.reshape(1, R * L, -1)], dim=1)
    positions = torch.cat([step.positions.reshape(1, B), started_step.positions.reshape(1, R * L)], dim=1)
    q, k, v = math.qkv(w, both, Step(positions=positions, mask=step.mask, slots=step.slots))  # (1, heads, N, hd)

    def own(t: torch.Tensor) -> torch.Tensor:  # (1, heads, N, hd) -> (B, heads, 1, hd)
        return t[:, :, :B].permute(2, 1, 0, 3)

    def theirs(t: torch.Tensor) -> torch.Tensor:  # (1, heads, N, hd) -> (R, heads, L, hd)
        return t[0, :, B:].reshape(t.shape[1], R, L, -1).transpose(0, 1)

    kv.write(step.slots, own(k), own(v))
    a_own = kv.attend(own(q), step.mask_for(math), math.scale, step.reads).to(x.device, x.dtype)  # (B, 1, nh * hd)
    k_new, v_new = theirs(k), theirs(v)
    kv.write_rows(rows, slots, k_new, v_new)
    a_theirs = attention(theirs(q), k_new, v_new, started_step.mask_for(math), math.scale)  # (R, L, nh * hd)
    a = torch.cat([a_own.reshape(1, B, -1), a_theirs.reshape(1, R * L, -1)], dim=1)
    out = math.finish(w, both, a)
    return out[:, :B].reshape(B, 1, -1), out[:, B:].reshape(R, L, -1)
