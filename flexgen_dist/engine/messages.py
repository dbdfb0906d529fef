"""A rank's messages in a pipeline: hidden states forward, sampled tokens back to the first rank,
and whether a block is still live (parallel/comm.py carries them; schedule/block.py orders them).

A block whose every sequence has stopped ends on every rank: the first stage knows once the
previous token of each GPU batch is back, and says so to the next stage before the task's
activations (`SendControl`), which passes it on. The remaining tasks of a dead block still send
and receive their (empty) messages, so no rank ever waits for one that will not come, but they
load and compute nothing.

With refill (engine/refill.py) the control message also names the rows that start a new prompt
at the task (the ranks between the first and the last learn it only so), and a batch whose rows
start prompts sends their hidden state as a second message after its own.

Every tensor that arrives from a peer crosses to where the engine uses it here, in `_Arriving`,
and nowhere else: hidden states to the compute device in the compute dtype, token ids and
control flags to the host, where the block's token state lives. Under NCCL they arrive on the
GPU; a tensor on one device mixed with one on another is a crash the CPU never shows.
"""

from __future__ import annotations

import torch

from ..parallel.comm import ACTIVATIONS, CONTROL, TOKENS, Comm
from ..schedule import block as ops
from .blocks import BlockState


HOST = torch.device("cpu")


class _Arriving:
    """A receive in flight; its tensor is moved to `device` (and `dtype`) as it is taken."""

    def __init__(self, pending, device: torch.device, dtype: torch.dtype | None = None):
        self._pending, self._device, self._dtype = pending, device, dtype

    def result(self) -> torch.Tensor:
        return self._pending.result().to(device=self._device, dtype=self._dtype)


class Messages:
    def __init__(self, *, comm: Comm, gpu_batch_size: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, tracer):
        self.comm, self.gpu_batch_size, self.hidden_size, self.dtype = comm, gpu_batch_size, hidden_size, dtype
        self.device, self.tracer = device, tracer

    def _recv(self, shape, dtype: torch.dtype, src: int, tag: int, device: torch.device) -> _Arriving:
        return _Arriving(self.comm.recv(shape, dtype, src, tag), device, dtype)

    def handle(self, op, walk, state: BlockState) -> bool:
        """Run `op` if it is a message; False if it is not."""
        label = f"(block {op.block_idx}, token {op.token_idx})"
        span = self.tracer.span
        if isinstance(op, ops.SendActivation):
            hidden = state.hidden.pop(op.batch_idx, None)
            if hidden is None:  # a dead task computed nothing: the receiver still expects a message
                hidden = torch.zeros(self._activation_shape(state, op.token_idx), dtype=self.dtype)
            with span(f"send activation batch {op.batch_idx} {label} to rank {op.dst}", "send"):
                walk.sent(self.comm.send(hidden, op.dst, ACTIVATIONS))
                started = state.refill_hidden.pop(op.batch_idx, None)
                if started is not None:
                    walk.sent(self.comm.send(started, op.dst, ACTIVATIONS))
        elif isinstance(op, ops.RecvActivation):
            with span(f"recv activation batch {op.batch_idx} {label} from rank {op.src}", "recv"):
                shape = self._activation_shape(state, op.token_idx)
                state.incoming[op.batch_idx] = self._recv(shape, self.dtype, op.src, ACTIVATIONS, self.device)
                started = state.refill_shape(op.token_idx, op.batch_idx, self.hidden_size) \
                    if walk.lender and not walk.is_dead(op.block_idx, op.token_idx) else None
                if started is not None:
                    state.refill_incoming[op.batch_idx] = self._recv(started, self.dtype, op.src, ACTIVATIONS, self.device)
        elif isinstance(op, ops.SendControl):
            live = [0 if walk.is_dead(op.block_idx, op.token_idx) else 1]
            if walk.lender:  # and which rows start a new prompt now
                starts = set(state.starts_at(op.token_idx))
                live += [int(row in starts) for row in range(state.valid.shape[0])]
            with span(f"send control {label} to rank {op.dst}", "send"):
                walk.sent(self.comm.send(torch.tensor(live, dtype=torch.long), op.dst, CONTROL))
        elif isinstance(op, ops.RecvControl):
            size = 1 + (state.valid.shape[0] if walk.lender else 0)
            with span(f"recv control {label} from rank {op.src}", "recv"):
                control = self._recv((size,), torch.long, op.src, CONTROL, HOST).result().tolist()
            if not control[0]:
                walk.mark_dead(op.block_idx, op.token_idx)
            elif walk.lender and not walk.stage.is_last:  # the last rank decided the same itself
                state.start_rows(op.token_idx, [row for row, flag in enumerate(control[1:]) if flag])
        elif isinstance(op, ops.SendTokens):
            ids = state.sampled(op.token_idx, op.batch_idx)
            with span(f"send tokens batch {op.batch_idx} {label} to rank {op.dst}", "send"):
                walk.sent(self.comm.send(ids, op.dst, TOKENS))
        elif isinstance(op, ops.RecvTokens):
            with span(f"recv tokens batch {op.batch_idx} {label} from rank {op.src}", "recv"):
                ids = self._recv((self.gpu_batch_size,), torch.long, op.src, TOKENS, HOST).result()
            state.record_tokens(op.token_idx, op.batch_idx, ids)
            last_batch = op.batch_idx == walk.stage.num_batches - 1
            if last_batch and state.may_run(op.token_idx + 1) and bool(state.done.all()):
                walk.mark_dead(op.block_idx, op.token_idx + 1)  # every row stopped: the rest of the block ends
        else:
            return False
        return True

    def _activation_shape(self, state: BlockState, token_idx: int) -> tuple[int, int, int]:
        width = state.block.prompt_len if token_idx == 0 else 1
        return (self.gpu_batch_size, width, self.hidden_size)
