"""Inf and NaN in layer outputs, found without stalling the device.

Without a check, NaN logits sample token 0 forever and a run ends "successfully". Each layer
output sets one flag on the device (no wait). When a task's last layer on this stage is done, its
flags start their way to the host (a non-blocking copy and an event on a GPU) and are read one
task later, by which time the copy has long landed: reading them at once would make the host
wait for every kernel queued so far, on every stage, for every batch and token. A stage whose
last layer is the head samples right there (a wait it pays anyway), so it reads its flags at
once; every block is read in full before it closes, so no result leaves with a NaN behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class TaskKey:
    block_idx: int
    token_idx: int
    batch_idx: int


@dataclass
class _Sent:
    key: TaskKey
    flags: torch.Tensor  # (layers,) bool on the host (pinned there on a GPU)
    done: object  # a CUDA event recorded after the copy, or None


class FiniteWatch:
    """Flags per layer of one stage; `describe(layer_idx)` names a schedule layer for the message."""

    def __init__(self, layers: range, device: torch.device, describe, compute_dtype: str):
        self.layers, self.device, self.describe, self.compute_dtype = layers, device, describe, compute_dtype
        self._flags: dict[tuple[int, int], torch.Tensor] = {}  # (block, batch) -> flags of the task running
        self._sent: list[_Sent] = []  # finished tasks whose flags are not read yet, oldest first

    def note(self, key: TaskKey, layer_idx: int, x: torch.Tensor) -> None:
        """Flag whether `x`, the output of `layer_idx`, holds inf or NaN (on its device, no wait)."""
        flags = self._flags.get((key.block_idx, key.batch_idx))
        if flags is None:
            flags = self._flags[key.block_idx, key.batch_idx] = torch.zeros(len(self.layers), dtype=torch.bool, device=x.device)
        flags[layer_idx - self.layers[0]] = ~torch.isfinite(x).all()

    def task_done(self, key: TaskKey, *, read_now: bool) -> None:
        """The stage's last layer of `key` is queued: send its flags on their way; read those of
        earlier tasks (and this one's too when `read_now`). Raises UserError on a flagged layer."""
        flags = self._flags.pop((key.block_idx, key.batch_idx))
        if flags.device.type == "cuda":
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(flags.device))
            self._sent.append(_Sent(key, host, done))
        else:
            self._sent.append(_Sent(key, flags, None))
        self._read(lambda sent: read_now or (sent.key.block_idx, sent.key.token_idx) != (key.block_idx, key.token_idx))

    def read_block(self, block_idx: int) -> None:
        """Read every flag of `block_idx` (before its results leave)."""
        self._read(lambda sent: sent.key.block_idx == block_idx)

    def read_all(self) -> None:
        self._read(lambda sent: True)

    def forget(self) -> None:
        """Drop what is pending (a failing run: the error that matters is already raised)."""
        self._flags.clear()
        self._sent.clear()

    def _read(self, due) -> None:
        keep = []
        for sent in self._sent:
            if not due(sent):
                keep.append(sent)
                continue
            if sent.done is not None:
                sent.done.synchronize()  # the copy, not everything queued since
            if bool(sent.flags.any()):
                self._sent = keep
                self._raise(sent)
        self._sent = keep

    def _raise(self, sent: _Sent) -> None:
        first = self.layers[0] + int(sent.flags.nonzero()[0])
        key = sent.key
        raise UserError(
            f"the output of {self.describe(first)} (schedule layer {first}) holds inf or NaN at token {key.token_idx} of "
            f"block {key.block_idx}: the checkpoint's values overflow {self.compute_dtype}; compute in float32 "
            "(or bfloat16 on a GPU) with --compute-dtype"
        )
