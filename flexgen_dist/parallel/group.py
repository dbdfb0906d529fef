"""The process group of a multi-rank run: created and destroyed here, and nowhere else.

    with Pipeline.start(ctx, timeout_s=300) as pipeline:
        llm = LLM(model, pipeline=pipeline, ...)  # waits longer once its plan predicts long tasks

With one process (world size 1) nothing is created and `pipeline.comm` is None: the single-GPU
(or CPU) fallback needs no process group at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..errors import EnvironmentFailure, SharedError, UserError, first_line
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

        from .comm import CommWait, PeerError, process_group_timeout

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
