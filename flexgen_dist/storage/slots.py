"""A fixed number of equal, reusable flat buffers on one device ("slots").

Loaded weights and KV scratch copies land in slots instead of fresh tensors: the count and size
come from the placement, so memory is bounded by construction (no pool that grows with every new
shape), and nothing is allocated per step (a fresh multi-MB tensor costs page faults every time).

Ordering on a GPU. A slot is filled on a loading stream and read by kernels queued on the compute
stream. When the compute thread gives a slot back, those kernels may not have run yet, so `give`
records an event on the giving thread's current stream, and `take` makes the taking thread's
current stream wait for it before anything is written into the slot. On the CPU there are no
streams and both are no-ops.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from dataclasses import dataclass

import torch

from ..planning.placement import SlotPiece

log = logging.getLogger(__name__)


class StreamOrder:
    """Events between the stream that last used a slot and the stream that reuses it, on
    `device`'s streams (named, not the calling thread's current device: a fresh thread's is 0)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def mark_released(self):
        """An event on the current stream: everything queued so far has used the slot."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait_released(self, event) -> None:
        """Queue work after `event` on the current stream (the writer's)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "uint8": torch.uint8}


@dataclass
class Slot:
    index: int
    data: torch.Tensor  # flat bytes (uint8)
    released: object = None  # the event recorded when it was last given back

    def view(self, piece: SlotPiece, rows: int | None = None) -> torch.Tensor:
        """The piece's tensor (its first `rows` rows when given: a shorter sequence)."""
        shape = piece.shape if rows is None else (rows, *piece.shape[1:])
        dtype = _DTYPES[piece.dtype]
        nbytes = math.prod(shape) * dtype.itemsize
        return self.data[piece.offset : piece.offset + nbytes].view(dtype).view(shape)

    def heads_major_view(self, piece: SlotPiece, rows: int) -> torch.Tensor:
        """A KV cache piece indexed as (S, B, nkv, hd), position first as every reader and writer
        expects, but laid out (B, nkv, S, hd): each head's positions are contiguous, as attention
        reads them. On a CPU, SDPA over a position-major cache (rows of one head 128 bytes apart
        every B * kv_dim) runs 3-5x slower than over this layout (64 rows, 168 positions: 213-290
        ms against 41 ms a layer). A scratch copy of a cache loaded from host memory or disk is
        laid out so by the copy that loads it: converting fp16 into a bf16 layout heads-major costs
        40 ms against 24 ms straight (64 rows, 168 positions, OPT-1.3B's 32 heads), and saves 100."""
        seq, batch, heads, head_dim = self.view(piece, rows).shape
        return self.view(piece, rows).view(batch, heads, seq, head_dim).permute(2, 0, 1, 3)


CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context, not one


def pin_in_place(data: torch.Tensor, device: torch.device) -> None:
    """Page-lock a host tensor where it is, at its exact size, for copies to and from `device`.
    (`pin_memory=True` goes through the caching host allocator, which rounds every block up to a
    power of two and keeps it: a plan counting the real size would be off by up to 2x.)"""
    nbytes = data.numel() * data.element_size()
    with torch.cuda.device(device):  # that device's context, never a new one on device 0
        err = torch.cuda.cudart().cudaHostRegister(data.data_ptr(), nbytes, CUDA_HOST_REGISTER_PORTABLE)
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (error {err})")


def unpin(data: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(data.data_ptr())


def _unpin_all(pinned: list[torch.Tensor], device: torch.device) -> None:
    """Unregister every tensor of `pinned` (emptied) once `device` has finished what it queued:
    a copy from or into these pages may still be in flight. Called once, by `close` or when the
    owner is collected; until then the list keeps the memory alive, so registered pages are never
    freed."""
    if not pinned:
        return
    with torch.cuda.device(device):
        try:
            torch.cuda.synchronize(device)
        except RuntimeError as exc:  # a broken context runs nothing more: unregistering is safe
            log.warning("synchronize before unpinning host memory failed: %s", exc)
        while pinned:
            unpin(pinned.pop())


class SlotPool:
    """`count` slots of `nbytes` each on `device`. Host slots are page-locked in place for the
    CUDA device `pin` (None: not pinned), and unpinned by `close` or, for a pool dropped without
    it, when the pool is collected."""

    def __init__(self, count: int, nbytes: int, device: torch.device, pin: torch.device | None = None,
                 order: StreamOrder | None = None):
        if pin is True:
            raise TypeError("pin takes the CUDA device that copies to and from the slots, not a bool")
        self.nbytes_each = nbytes
        self.order = order or StreamOrder(device)
        self.slots = [Slot(i, torch.empty(nbytes, dtype=torch.uint8, device=device)) for i in range(count)]
        self._unpin = None
        if pin and device.type == "cpu" and torch.cuda.is_available() and nbytes > 0:
            pinned: list[torch.Tensor] = []  # held by the finalizer, not by the pool
            self._unpin = weakref.finalize(self, _unpin_all, pinned, torch.device(pin))
            try:
                for slot in self.slots:
                    pin_in_place(slot.data, pin)
                    pinned.append(slot.data)
            except BaseException:
                self._unpin()  # what was pinned before the failure
                raise
        self._free = list(reversed(self.slots))
        self._cond = threading.Condition()

    def close(self) -> None:
        """Unpin host slots (the memory goes when the pool is dropped)."""
        if self._unpin is not None:
            self._unpin()

    @property
    def nbytes(self) -> int:
        return sum(s.data.numel() * s.data.element_size() for s in self.slots)

    def take(self) -> Slot:
        """A free slot, ready to be written on the caller's current stream. Waits while all are
        lent (the schedule bounds how many are in use, so this does not wait in practice)."""
        with self._cond:
            while not self._free:
                self._cond.wait()
            slot = self._free.pop()
        self.order.wait_released(slot.released)
        slot.released = None
        return slot

    def give(self, slot: Slot) -> None:
        """Back to the pool once the work queued on the caller's stream has used it."""
        slot.released = self.order.mark_released()
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    @property
    def num_free(self) -> int:
        with self._cond:
            return len(self._free)
