"""The process group of a multi-rank run: created and destroyed here, and nowhere else.

    with Pipeline.start(ctx, timeout_s=300) as pipeline:
        llm = LLM(model, pipeline=pipeline, ...)

With one process (world size 1) nothing is created and `pipeline.comm` is None: the single-GPU
(or CPU) fallback needs no process group at all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .context import DistContext

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, ctx: DistContext, timeout_s: float, stage_layers: Sequence[int] | None = None):
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.stage_layers = list(stage_layers) if stage_layers is not None else None
        self.comm = None
        self._started = False

    @classmethod
    def start(cls, ctx: DistContext, timeout_s: float = 300.0, stage_layers: Sequence[int] | None = None) -> "Pipeline":
        """Join the process group (every rank must call it); a no-op with one process."""
        pipeline = cls(ctx, timeout_s, stage_layers)
        if ctx.world_size > 1:
            import torch

            from .comm import PipeComm, process_group_timeout

            ctx.init_process_group(process_group_timeout(timeout_s, ctx.backend))
            pipeline._started = True
            try:
                pipeline.comm = PipeComm(ctx.rank, ctx.world_size, ctx.backend, torch.device(ctx.device), timeout_s)
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

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (every rank must call it); one line naming the
        failure when a peer dies meanwhile."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        from .comm import PeerError

        every: list = [None] * self.world_size
        try:
            dist.all_gather_object(every, obj)
        except Exception as exc:
            others = [r for r in range(self.world_size) if r != self.rank]
            who = f"rank {others[0]}" if len(others) == 1 else "one of ranks " + ", ".join(map(str, others))
            raise PeerError(f"rank {self.rank}: exchanging the ranks' plans failed ({str(exc).splitlines()[0][:200]}); "
                            f"{who} died or hung") from None
        return every

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
