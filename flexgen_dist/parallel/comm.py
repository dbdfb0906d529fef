"""Point-to-point messages between pipeline stages, with a bounded wait.

The engine only sees `send(tensor, dst, tag) -> handle` and `recv(shape, dtype, src, tag) ->
pending`; both start at once (isend / irecv) so transfers overlap compute, and waiting on either
gives up after `timeout_s` with an error that names the peer, instead of hanging forever when a
rank has died or hung.

Two channels: hidden states flow forward (rank r -> r + 1, tag ACTIVATIONS) and sampled token
ids flow from the last rank back to the first (tag TOKENS). NCCL ignores tags and orders the
point-to-point operations of one communicator, so with two ranks a send 0 -> 1 queued behind a
receive 1 -> 0 could wait on each other: the token ring gets a process group of its own.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class PeerError(RuntimeError):
    """A peer rank died, hung, or closed its connection."""


class _Pending:
    def __init__(self, work, tensor: torch.Tensor, peer: int, what: str, comm: "PipeComm"):
        self._work, self._tensor, self._peer, self._what, self._comm = work, tensor, peer, what, comm
        self._finished = False

    def _wait_done(self) -> None:
        if self._finished:
            return
        try:
            ok = self._work.wait(timeout=timedelta(seconds=self._comm.timeout_s))
        except Exception as exc:  # gloo raises on a closed connection or a timeout
            raise PeerError(
                f"rank {self._comm.rank}: {self._what} rank {self._peer} failed after at most "
                f"{self._comm.timeout_s:g} s ({str(exc).splitlines()[0][:200]}); rank {self._peer} died or hung"
            ) from None
        if ok is False:
            raise PeerError(f"rank {self._comm.rank}: {self._what} rank {self._peer} timed out after {self._comm.timeout_s:g} s")
        self._finished = True


class SendHandle(_Pending):
    def wait(self) -> None:
        self._wait_done()

    def done(self) -> bool:
        """Finished without waiting (then its buffer can be dropped)."""
        if not self._finished and self._work.is_completed():
            self._wait_done()  # raises if it failed
        return self._finished


class RecvHandle(_Pending):
    def result(self) -> torch.Tensor:
        self._wait_done()
        return self._tensor


class Comm(Protocol):
    """What the engine needs of the pipeline's point-to-point messages."""

    rank: int
    world_size: int

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> SendHandle: ...

    def recv(self, shape, dtype: torch.dtype, src: int, tag: int) -> RecvHandle: ...


ACTIVATIONS, TOKENS, CONTROL = 1, 2, 3  # CONTROL (is a block still live) goes the activations' way


def process_group_timeout(wait_s: float, backend: str = "nccl") -> float:
    """The process group's own timeout. NCCL's watchdog aborts the process when it fires, so there
    it is longer than the engine's bounded waits: a dead peer is reported by name first. gloo
    only raises in the waiting call, so there it is the wait itself (collectives such as the
    ranks' exchange of plans give up as soon as the engine's waits would)."""
    return 2 * wait_s + 60 if backend == "nccl" else wait_s


class PipeComm:
    def __init__(self, rank: int, world_size: int, backend: str, device: torch.device, timeout_s: float):
        """Every rank must build it at the same point: creating the token ring's group is collective."""
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        # gloo moves host tensors only; NCCL moves device tensors
        self.wire_device = torch.device("cpu") if backend == "gloo" else device
        try:
            ring = dist.new_group(list(range(world_size)),
                                  timeout=timedelta(seconds=process_group_timeout(timeout_s, backend)))
        except Exception as exc:  # a peer died or hung while the groups were being set up
            raise PeerError(
                f"rank {rank}: setting up the token ring with the other ranks failed "
                f"({str(exc).splitlines()[0][:200]}); a peer rank died or hung"
            ) from None
        self._groups = {ACTIVATIONS: None, CONTROL: None, TOKENS: ring}  # None: the default group

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> SendHandle:
        data = tensor.detach().to(self.wire_device).contiguous()
        return SendHandle(self._start(dist.isend, data, dst, tag, "sending to"), data, dst, "sending to", self)

    def recv(self, shape, dtype: torch.dtype, src: int, tag: int) -> RecvHandle:
        buf = torch.empty(shape, dtype=dtype, device=self.wire_device)
        return RecvHandle(self._start(dist.irecv, buf, src, tag, "receiving from"), buf, src, "receiving from", self)

    def _start(self, fn, tensor, peer: int, tag: int, what: str):
        try:
            return fn(tensor, peer, group=self._groups[tag], tag=tag)
        except Exception as exc:  # the connection to a dead peer fails as soon as it is used
            raise PeerError(
                f"rank {self.rank}: {what} rank {peer} failed ({str(exc).splitlines()[0][:200]}); rank {peer} died or hung"
            ) from None
