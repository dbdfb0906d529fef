"""The process group of a multi-rank run: created and destroyed here, and nowhere else.

    with Pipeline.start(ctx, timeout_s=300) as pipeline:
        llm = LLM(model, pipeline=pipeline, ...)  # waits longer once its plan predicts long tasks

With one process (world size 1) nothing is created and `pipeline.comm` is None: the single-GPU
(or CPU) fallback needs no process group at all.

The ranks agree before they compute (`agree`): every rank reads its own command line and files;
activations then cross ranks as raw tensors, so two ranks started with another checkpoint of the
same shape would compute a wrong answer and exit 0, and two of different shapes or settings would
die in the transport ("Received data size doesn't match") or wait out --comm-timeout. Each rank
states what must match (a job's `run_record`) and all ranks refuse together, in one line from
rank 0 naming the first difference and the rank. A rank that could not even state it (its model
folder is missing, its input does not parse) sends its error instead, and rank 0 shows it,
whichever rank it was: the others would otherwise wait for it and say only that it died.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..errors import EnvironmentFailure, PeerError, SharedError, UserError, first_line
from .context import DistContext

T = TypeVar("T")

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, ctx: DistContext, timeout_s: float, stage_layers: Sequence[int] | None = None):
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.wait = None  # CommWait with several ranks: how long to wait for a peer (`start`, `expect_tasks`)
        self.stage_layers = list(stage_layers) if stage_layers is not None else None
        self.comm = None
        self._started = False

    @classmethod
    def start(cls, ctx: DistContext, timeout_s: float = 300.0, stage_layers: Sequence[int] | None = None) -> "Pipeline":
        """Join the process group (every rank must call it); a no-op with one process.

        timeout_s: the least a rank waits for a peer (--comm-timeout); `expect_tasks` raises it
        when the plan predicts tasks that long waits could cut short."""
        pipeline = cls(ctx, timeout_s, stage_layers)
        if ctx.world_size > 1:
            import torch

            from .comm import CommWait, PipeComm, process_group_timeout

            pipeline.wait = CommWait.floor(timeout_s)
            ctx.init_process_group(process_group_timeout(timeout_s, ctx.backend))
            pipeline._started = True
            try:
                pipeline.comm = PipeComm(ctx.rank, ctx.world_size, ctx.backend, torch.device(ctx.device),
                                         pipeline.wait)
            except BaseException:
                pipeline.close()
                raise
            log.info("process group ready: rank %d of %d joined via %s", ctx.rank, ctx.world_size, ctx.init_method)
        return pipeline

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    def expect_tasks(self, task_s: float) -> None:
        """The plan predicts that a rank's longest task takes `task_s` seconds: wait for a peer
        as long as that needs (`comm.wait_for_tasks`), never less than `timeout_s`."""
        if self.world_size == 1:
            return
        from .comm import PipeComm, wait_for_tasks

        self.wait = wait_for_tasks(task_s, self.world_size, self.timeout_s)
        if isinstance(self.comm, PipeComm):
            self.comm.set_wait(self.wait)
        log.info("rank %d waits up to %g s for a peer (%s)", self.rank, self.wait.seconds, self.wait.source)

    def gather(self, obj, what: str = "plans") -> list:
        """Every rank's `obj`, in rank order (every rank must call it); one line naming the
        failure when a peer dies meanwhile."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        from .comm import CommWait, process_group_timeout

        every: list = [None] * self.world_size
        try:
            dist.all_gather_object(every, obj)
        except Exception as exc:
            others = [r for r in range(self.world_size) if r != self.rank]
            who = f"rank {others[0]}" if len(others) == 1 else "one of ranks " + ", ".join(map(str, others))
            wait = self.wait or CommWait.floor(self.timeout_s)
            waited = process_group_timeout(wait.seconds, self.ctx.backend)  # a collective waits out its group's timeout
            raise PeerError(f"rank {self.rank}: exchanging the ranks' {what} (all_gather_object) failed after waiting at "
                            f"most {waited:g} s ({wait.source}) ({first_line(exc)}); {who} died or hung") from None
        return every

    def together(self, compute: Callable[[], T], what: str, share: Callable[[T], object] = lambda value: value
                 ) -> tuple[T, list]:
        """Every rank runs `compute` (every rank must call this): its result, and every rank's
        `share` of its own result in rank order. When a rank fails (a mistake, or its
        environment), every rank raises that rank's error together, at the first rank that failed:
        a `SharedError` naming the rank (printed once, by rank 0) or an `EnvironmentFailure`,
        instead of the others waiting for it until the timeout and saying only that it left."""
        if self.world_size == 1:
            value = compute()
            return value, [share(value)]
        error: BaseException | None = None
        value = None
        try:
            value = compute()
            mine: tuple = ("ok", share(value))
        except (UserError, EnvironmentFailure) as exc:
            error = exc
            mine = ("user" if isinstance(exc, UserError) else "failed", str(exc))
        every = self.gather(mine, what=what)
        for rank, (kind, told) in enumerate(every):
            if kind == "ok":
                continue
            if rank == self.rank == 0:
                raise error
            told = f"rank {rank}: {first_line(told)}"
            raise SharedError(told) if kind == "user" else EnvironmentFailure(told)
        return value, [shared for _, shared in every]

    def agree(self, start: Callable[[], T], record: Callable[[T], dict[str, str]]) -> T:
        """Every rank calls it: each runs `start` and states `record` of its result (or fails to),
        then all raise together at the first rank that failed or the first field in which a rank
        differs from rank 0; else `start`'s result. With one process, `start()` alone."""
        if self.world_size == 1:
            return start()
        result, every = self.together(start, what="starting states", share=record)
        first = every[0]
        for rank, theirs in enumerate(every[1:], start=1):
            for field, value in first.items():
                if theirs.get(field) != value:
                    raise SharedError(
                        f"the ranks disagree on {field}: rank {rank} has {_shown(theirs.get(field))}, rank 0 "
                        f"{_shown(value)}; start every rank with the same command, model and input files")
        return result

    def share_from_rank0(self, compute: Callable[[], T]) -> T:
        """Rank 0 computes a value and every rank returns it; rank 0's error raises on every rank
        (so no rank waits for a run that will not start). With one process, just `compute()`."""
        if self.world_size == 1:
            return compute()
        import torch
        import torch.distributed as dist

        box: list = [None]
        error: BaseException | None = None
        if self.rank == 0:
            try:
                box[0] = ("ok", compute())
            except BaseException as exc:  # told to the others, then raised here
                error = exc
                box[0] = ("user" if isinstance(exc, UserError) else "failed", str(exc))
        device = torch.device(self.ctx.device) if self.ctx.backend == "nccl" else None
        try:
            dist.broadcast_object_list(box, src=0, device=device)
        except Exception as exc:  # a peer died or hung: one line naming it, exit 1
            others = ", ".join(str(r) for r in range(1, self.world_size))
            what, who = ("telling", f"rank {others}") if self.rank == 0 else ("hearing from", "rank 0")
            raise PeerError(f"rank {self.rank}: {what} the other ranks which prompts are left failed "
                            f"({first_line(exc)}); {who} died or hung") from None
        if error is not None:
            raise error
        kind, value = box[0]
        if kind == "user":
            raise SharedError(value)  # printed by rank 0 alone
        if kind == "failed":
            raise EnvironmentFailure(f"rank 0 could not start the run: {value}")
        return value

    def close(self) -> None:
        """Leave the process group. Safe to call twice."""
        if self._started:
            self._started = False
            self.comm = None
            self.ctx.destroy()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shown(value: str | None) -> str:
    return "none" if value is None else value if len(value) <= 60 else value[:57] + "..."
