"""Point-to-point messages between pipeline stages, with a bounded wait.

The engine only sees `send(tensor, dst, tag) -> handle` and `recv(shape, dtype, src, tag) ->
pending`; both start at once (isend / irecv) so transfers overlap compute, and waiting on either
gives up after a `CommWait` with one line that names the operation, the peer, the wait and where
it came from, instead of hanging forever when a rank has died or hung. The wait starts at the
user's --comm-timeout (while the ranks set up and exchange what they plan with) and grows with
the plan's predicted task time once there is a plan (`wait_for_tasks`): a prefill read from disk
can take minutes, and the wait must not take that for a dead peer. The process groups' own
timeouts stay above it (`process_group_timeout`), so the wait, not NCCL's watchdog, reports.

Two channels: hidden states flow forward (rank r -> r + 1, tag ACTIVATIONS) and sampled token
ids flow from the last rank back to the first (tag TOKENS). NCCL ignores tags and orders the
point-to-point operations of one communicator, so with two ranks a send 0 -> 1 queued behind a
receive 1 -> 0 could wait on each other: the token ring gets a process group of its own.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from ..errors import PeerError, first_line

log = logging.getLogger(__name__)


# --- how long to wait -------------------------------------------------------------------------------

WAIT_STEPS = 2
"""A message is posted up to one token step before it is waited on (NCCL counts the wait from the
post), and it arrives by the end of the next step at the latest."""
PREDICTION_SLACK = 3.0
"""Tasks ran up to about 3x slower than predicted (page cache reclaimed under a cgroup, README)."""


@dataclass(frozen=True)
class CommWait:
    """How long one send or receive may wait for its peer, and why (named in the error)."""

    seconds: float
    source: str

    @classmethod
    def floor(cls, seconds: float) -> "CommWait":
        """The user's --comm-timeout alone (before the plan exists, or when it asks for more)."""
        return cls(float(seconds), f"--comm-timeout {seconds:g} s")


def wait_for_tasks(task_s: float, num_ranks: int, floor_s: float) -> CommWait:
    """The wait for a pipeline whose longest task (one rank's layers for one token step of a
    block: the prefill of the longest prompt, usually) is predicted at `task_s` seconds.

    With P ranks, P blocks are in flight and a token step takes at most P tasks of the slowest
    rank (cost_model.combine); a message may wait WAIT_STEPS such steps, and predictions are off
    by up to PREDICTION_SLACK. The user's --comm-timeout (`floor_s`) is the least it ever waits.
    """
    if not (math.isfinite(task_s) and task_s >= 0):
        raise ValueError(f"predicted task time {task_s!r} s must be a finite number >= 0")
    if num_ranks < 1:
        raise ValueError(f"num_ranks={num_ranks} must be at least 1")
    if not (math.isfinite(floor_s) and floor_s > 0):
        raise ValueError(f"floor {floor_s!r} s must be a positive number of seconds")
    derived = math.ceil(WAIT_STEPS * PREDICTION_SLACK * num_ranks * task_s)  # whole seconds read better
    if derived <= floor_s:
        return CommWait.floor(floor_s)
    return CommWait(derived, f"from the plan: {WAIT_STEPS} steps x {PREDICTION_SLACK:g} x {num_ranks} ranks x "
                             f"predicted task {task_s:.3g} s; --comm-timeout {floor_s:g} s is the least")


def process_group_timeout(wait_s: float, backend: str = "nccl") -> float:
    """The process group's own timeout. NCCL's watchdog aborts the process when it fires, so there
    it is longer than the engine's bounded waits: a dead peer is reported by name first. gloo
    only raises in the waiting call, so there it is the wait itself (collectives such as the
    ranks' exchange of plans give up as soon as the engine's waits would)."""
    return 2 * wait_s + 60 if backend == "nccl" else wait_s


def _set_group_timeout(seconds: float, group) -> None:
    """Raise the timeout of a process group already made (None: the default group)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=seconds), group)


# --- messages ---------------------------------------------------------------------------------------

ACTIVATIONS, TOKENS, CONTROL = 1, 2, 3  # CONTROL (is a block still live) goes the activations' way
_CARRIES = {ACTIVATIONS: "hidden states", TOKENS: "token ids", CONTROL: "the block-live flag"}


class _Pending:
    def __init__(self, work, tensor: torch.Tensor, peer: int, op: str, comm: "PipeComm"):
        self._work, self._tensor, self._peer, self._op, self._comm = work, tensor, peer, op, comm
        self._finished = False

    def _wait_done(self) -> None:
        if self._finished:
            return
        wait, rank = self._comm.wait, self._comm.rank
        try:
            ok = self._work.wait(timeout=timedelta(seconds=wait.seconds))
        except Exception as exc:  # gloo raises on a closed connection or a timeout, NCCL on a timeout
            raise PeerError(f"rank {rank}: {self._op} failed after waiting at most {wait.seconds:g} s ({wait.source}) "
                            f"({first_line(exc)}); rank {self._peer} died or hung") from None
        if ok is False:
            raise PeerError(f"rank {rank}: {self._op} timed out after {wait.seconds:g} s ({wait.source}); "
                            f"rank {self._peer} died or hung")
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


class PipeComm:
    def __init__(self, rank: int, world_size: int, backend: str, device: torch.device, wait: CommWait):
        """Every rank must build it at the same point: creating the token ring's group is collective.

        wait: how long a send or receive may wait for its peer (`set_wait` changes it once the plan
        predicts how long tasks take)."""
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.wait = wait
        # gloo moves host tensors only; NCCL moves device tensors
        self.wire_device = torch.device("cpu") if backend == "gloo" else device
        try:
            ring = dist.new_group(list(range(world_size)),
                                  timeout=timedelta(seconds=process_group_timeout(wait.seconds, backend)))
        except Exception as exc:  # a peer died or hung while the groups were being set up
            raise PeerError(
                f"rank {rank}: setting up the token ring with the other ranks failed after waiting at most "
                f"{process_group_timeout(wait.seconds, backend):g} s ({wait.source}) ({first_line(exc)}); "
                "a peer rank died or hung"
            ) from None
        self._groups = {ACTIVATIONS: None, CONTROL: None, TOKENS: ring}  # None: the default group

    def set_wait(self, wait: CommWait) -> None:
        """Wait this long from now on; both process groups (the default one and the token ring's)
        get a timeout above it, so a late peer is named by the wait, not by NCCL's watchdog."""
        for group in {id(g): g for g in self._groups.values()}.values():
            _set_group_timeout(process_group_timeout(wait.seconds, self.backend), group)
        self.wait = wait

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> SendHandle:
        data = tensor.detach().to(self.wire_device).contiguous()
        op = f"sending {_CARRIES[tag]} to rank {dst}"
        return SendHandle(self._start(dist.isend, data, dst, tag, op), data, dst, op, self)

    def recv(self, shape, dtype: torch.dtype, src: int, tag: int) -> RecvHandle:
        buf = torch.empty(shape, dtype=dtype, device=self.wire_device)
        op = f"receiving {_CARRIES[tag]} from rank {src}"
        return RecvHandle(self._start(dist.irecv, buf, src, tag, op), buf, src, op, self)

    def _start(self, fn, tensor, peer: int, tag: int, op: str):
        try:
            return fn(tensor, peer, group=self._groups[tag], tag=tag)
        except Exception as exc:  # the connection to a dead peer fails as soon as it is used
            raise PeerError(f"rank {self.rank}: {op} failed ({first_line(exc)}); rank {peer} died or hung") from None
