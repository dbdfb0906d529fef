"""The engine: walks this rank's schedule (schedule/block.py), one handler per op type.

Where things are: what a run tracks (and a refill run's stretches of steps) in walk.py, block
state in blocks.py, KV caches and activations on their tiers in block_io.py, loaded weights in
storage/weights.py, one decoder layer in model/decoder.py, where loads run (thread pool, CUDA
streams) in block_io.py, messages between ranks in messages.py over parallel/comm.py (both imported only
when there are ranks to talk to: a single process has no comm).
"""

from __future__ import annotations

import time
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..model import LayerMath, decoder_layer, mixed_decoder_layer
from ..spec.layout import Unit, UnitKind
from ..planning.placement import Placement
from ..schedule import block as ops
from ..schedule.pipeline import lane_tasks, remaining_tasks
from ..storage.tiers import DiskReader, torch_dtype
from ..storage.weights import LoadedWeights, WeightStore
from .block_io import BlockIO
from .blocks import Block, BlockResult, BlockState
from .walk import FiniteWatch, TaskKey
from .blocks import KVLease
from .block_io import Loader, Ready
from .refill import Lender, RefillState
from .sampling import Sampler
from .walk import NoTracer, Tracing
from .walk import RunResult, Walk

if TYPE_CHECKING:  # annotations only
    from ..parallel.comm import Comm

@dataclass(frozen=True)
class EngineConfig:
    units: tuple[Unit, ...]  # this rank's contiguous slice of schedule layers
    placement: Placement  # where each tensor lives (planning/placement.py)
    device: torch.device  # the compute device
    offload_dir: Path | None  # disk-tier KV cache and activations of open blocks
    prefetch_depth: int = 1  # layers of weights loaded ahead of the computing one


class Engine:
    def __init__(self, *, config: EngineConfig, weights: WeightStore, math: LayerMath,
                 reader: DiskReader | None = None, comm: Comm | None = None, tracer: Tracing | None = None):
        if config.prefetch_depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {config.prefetch_depth}")
        self.config = config
        self.placement = config.placement
        self.policy = config.placement.policy
        self.spec = config.placement.spec
        self.device = config.device
        self.dtype = torch_dtype(config.placement.dtypes.compute)
        self.units = {unit.layer_idx: unit for unit in config.units}
        self.weights = weights
        self.math = math
        self.comm = comm
        self.tracer = tracer if tracer is not None else NoTracer()
        self.rank = comm.rank if comm is not None else 0
        self.num_ranks = comm.world_size if comm is not None else 1
        self.block_io = BlockIO(placement=self.placement, device=self.device, offload_dir=config.offload_dir,
                                reader=reader, rank=self.rank)
        # weight loads in flight, plus the next batch's cache
        self.loader = Loader(workers=config.prefetch_depth + 1, device=self.device, overlap=self.policy.overlap)
        self.messages = None
        if comm is not None:  # a pipeline of ranks
            from .messages import Messages

            self.messages = Messages(comm=comm, gpu_batch_size=self.policy.gpu_batch_size,
                                     hidden_size=self.spec.hidden_size, dtype=self.dtype, device=self.device,
                                     tracer=self.tracer)

    def close(self) -> None:
        self.loader.close()
        self.block_io.close_pools()

    def run(self, blocks: list[Block], sampler: Sampler,
            on_block_done: Callable[[int, BlockResult], None] | None = None,
            placement: Placement | None = None, refill: bool = False) -> RunResult:
        """Run every block through this rank's layers; blocks must be the same on every rank.
        `on_block_done(block_idx, result)` is called as each block closes on this rank (its
        results are meaningful on the first stage, which holds every sampled token).
        placement: this run's, sized by the front end for its blocks (their widest prompt, their
        limit, their shape); default: the engine's own. The engine only checks that the blocks
        fit it: it never plans.
        refill: a row whose sequence finished takes the next waiting prompt (refill.py): the first
        block of each pipeline lane stays open while the others lend them their prompts."""
        placement = placement or self.placement
        policy = placement.policy
        self._check_fit(blocks, placement)
        self.block_io.resize(placement)
        if self.messages is not None:
            self.messages.gpu_batch_size = policy.gpu_batch_size
        layers = sorted(self.units)
        stage = ops.StageShape(
            layers=range(layers[0], layers[-1] + 1),
            num_batches=policy.num_gpu_batches,
            cache_layers=frozenset(i for i, unit in self.units.items() if unit.has_cache),
            rank=self.rank,
            num_ranks=self.num_ranks,
        )
        tasks = lane_tasks([block.max_new_tokens for block in blocks], self.num_ranks)
        finite = FiniteWatch(stage.layers, self.device, self._describe, self.placement.dtypes.compute)
        walk = Walk(blocks, tasks, stage, sampler, finite, on_block_done)
        lanes = min(self.num_ranks, len(blocks))
        if refill and len(blocks) > lanes and not any(block.score for block in blocks):
            walk.lender = Lender(blocks, lanes, on_block_done)
            walk.blocks = [walk.lender.open_block(lane) for lane in range(lanes)]
            walk.lanes = list(range(lanes))
        # what prefill tasks compute: with refill only the lanes' blocks (the others' prompts start
        # in their rows, inside decode steps)
        real = [(b, row) for b in walk.blocks for row, seq_id in enumerate(b.seq_ids) if seq_id >= 0]
        prefilled = (sum(int(b.prompt_mask[row].sum()) for b, row in real), len(real))
        try:
            if walk.lender:
                plan = walk.refill_plan(0, num_ranks=self.num_ranks, prefetch_depth=self.config.prefetch_depth)
            else:
                plan = ops.rank_schedule(tasks, stage, self.config.prefetch_depth)
            while plan:
                plan = self._walk(plan, walk)
            for handle in walk.sends:
                handle.wait()
            walk.finite.read_all()
        except BaseException:
            self._tear_down(walk, failed=True)
            raise
        self._tear_down(walk, failed=False)
        results = walk.lender.results if walk.lender else walk.results
        return RunResult([results.get(b, BlockResult([])) for b in range(len(blocks))], *walk.phase_s, walk.row_steps,
                         *prefilled)

    @staticmethod
    def _check_fit(blocks: list[Block], placement: Placement) -> None:
        """Blocks wider, longer or of another shape than their placement would overrun its buffers."""
        w, rows = placement.workload, placement.policy.block_size
        for block_idx, block in enumerate(blocks):
            if (block.input_ids.shape[0] != rows or block.prompt_len > w.prompt_len
                    or block.prompt_len + block.max_new_tokens > w.seq_len):
                raise ValueError(f"block {block_idx} ({block.input_ids.shape[0]} rows, prompt {block.prompt_len} + "
                                 f"{block.max_new_tokens} new) does not fit its placement ({rows} rows, prompt "
                                 f"{w.prompt_len} + {w.gen_len}): size the placement for the blocks first")

    def _walk(self, plan: list, walk: Walk) -> list:
        """Execute ops in order; returns a new plan when a block finished early (one rank), else []."""
        current, started = None, time.perf_counter()
        for op in plan:
            if isinstance(op, ops.Compute) and (op.block_idx, op.token_idx) != current:
                now = time.perf_counter()
                if current is not None:
                    walk.phase_s[current[1] > 0] += now - started
                started, current = now, (op.block_idx, op.token_idx)
                if self.num_ranks == 1 and op.token_idx > 0 and bool(walk.states[op.block_idx].done.all()):
                    # Every row stopped: drop the rest of this block and re-plan what remains.
                    self._drop_loads(walk)
                    self._close_block(walk, op.block_idx)
                    if walk.lender:
                        walk.lanes.remove(op.block_idx)
                        return []
                    remaining = remaining_tasks(walk.tasks, {op.block_idx}, current)
                    return ops.rank_schedule(remaining, walk.stage, self.config.prefetch_depth)
            self._execute(op, walk)
            walk.sends = [handle for handle in walk.sends if not handle.done()]
        if current is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            walk.phase_s[current[1] > 0] += time.perf_counter() - started
        if walk.lender and walk.lanes:  # the open blocks' stretch of steps ran out before their rows did
            for b in list(walk.lanes):
                ended = walk.is_dead(b, current[1]) if self.num_ranks > 1 else bool(walk.states[b].done.all())
                if ended:
                    self._close_block(walk, b)
                    walk.lanes.remove(b)
            if not walk.lanes:
                return []
            return walk.refill_plan(current[1] + 1, num_ranks=self.num_ranks, prefetch_depth=self.config.prefetch_depth)
        return []

    def _tear_down(self, walk: Walk, failed: bool) -> None:
        """Loads finished and given back, open blocks closed (their files removed), KV memory freed."""
        self._drop_loads(walk)
        if self.device.type == "cuda":  # copies into host memory (KV stores) may still run: let them land first
            try:
                torch.cuda.synchronize(self.device)
            except RuntimeError:
                if not failed:
                    raise  # after a failure, that failure is the error to report (a CUDA one comes back here)
        for state in list(walk.states.values()):
            self.block_io.close(state)
        walk.states.clear()
        self.block_io.close_pools(check=not failed)

    def _drop_loads(self, walk: Walk) -> None:
        """Wait for loads in flight and give their buffers back (their compute will not come)."""
        for fut in walk.weight_loads.values():
            try:
                self.weights.release(fut.result())
            except Exception:  # the run is failing already; the error that matters is raised
                pass
        for fut in walk.cache_loads.values():
            try:
                self.block_io.release(fut.result())
            except Exception:
                pass
        walk.weight_loads.clear()
        walk.cache_loads.clear()

    def _close_block(self, walk: Walk, block_idx: int) -> None:
        walk.finite.read_block(block_idx)  # no result leaves with an unread NaN behind it
        state = walk.states.pop(block_idx)
        walk.row_steps += state.valid.shape[0] * state.steps_run
        result = self.block_io.close(state)
        if walk.lender:
            return  # each block's results went out through the lender as its last sequence ended
        walk.results[block_idx] = result
        if walk.on_block_done is not None:
            walk.on_block_done(block_idx, result)

    # --- one handler per op ----------------------------------------------------------------------
    def _execute(self, op, walk: Walk) -> None:
        if isinstance(op, ops.LoadWeight):
            if walk.is_dead(op.block_idx, op.token_idx):
                walk.weight_loads[op] = Ready(None)  # a dead task computes nothing
                return
            name = f"load weight L{op.layer_idx} (block {op.block_idx}, token {op.token_idx})"
            on_demand = self.policy.experts_on_demand and op.token_idx > 0
            walk.weight_loads[op] = self.loader.submit(self._traced, name, "load", self.weights.load, op.layer_idx,
                                                       on_demand)
        elif isinstance(op, ops.FreeWeight):
            loaded = walk.weight_loads.pop(ops.LoadWeight(op.block_idx, op.token_idx, op.layer_idx)).result()
            if loaded is not None:
                self.weights.release(loaded)
        elif isinstance(op, ops.OpenBlock):
            start = RefillState.open(walk.lender, op.block_idx) if walk.lender else BlockState.start
            walk.states[op.block_idx] = self.block_io.open(walk.blocks[op.block_idx], start)
        elif isinstance(op, ops.CloseBlock):
            self._close_block(walk, op.block_idx)
        elif self.messages is None or not self.messages.handle(op, walk, walk.states[op.block_idx]):
            self._execute_in_block(op, walk, walk.states[op.block_idx])

    def _execute_in_block(self, op, walk: Walk, state: BlockState) -> None:
        label = f"L{op.layer_idx} batch {op.batch_idx} (block {op.block_idx}, token {op.token_idx})"
        span, io = self.tracer.span, self.block_io
        if walk.is_dead(op.block_idx, op.token_idx):  # every row stopped: only the messages still flow
            if isinstance(op, ops.Compute):
                if op.batch_idx in state.incoming:
                    state.incoming.pop(op.batch_idx).result()  # an empty input, taken off the wire in order
                early = walk.cache_loads.pop(ops.LoadCache(*astuple(op)), None)  # prefetched before the news
                if early is not None:
                    self.block_io.release(early.result())
            return
        if isinstance(op, ops.LoadCache):
            walk.cache_loads[op] = self.loader.submit(
                self._traced, f"load cache {label}", "load", io.load_cache, state, op.token_idx, op.layer_idx, op.batch_idx)
        elif isinstance(op, ops.Compute):
            self._compute(op, walk, state, label)
        elif isinstance(op, ops.StoreCache):
            with span(f"store cache {label}", "store"):
                io.store_cache(state, op.token_idx, op.layer_idx, op.batch_idx)
        elif isinstance(op, ops.StoreActivation):
            with span(f"store activation {label}", "store"):
                io.store_act(state, op.batch_idx)
        elif isinstance(op, ops.LoadActivation):
            with span(f"load activation {label}", "load"):
                io.load_act(state, op.batch_idx)
        else:
            raise TypeError(f"unknown op {op!r}")

    def _compute(self, op: ops.Compute, walk: Walk, state: BlockState, label: str) -> None:
        span, batch_idx = self.tracer.span, op.batch_idx
        if batch_idx in state.incoming:  # this stage's input, from the previous stage
            with span(f"recv activation wait {label}", "recv"):
                state.hidden[batch_idx] = state.incoming.pop(batch_idx).result()  # on the device (messages.py)
                if batch_idx in state.refill_incoming:  # and that of prompts starting in some rows
                    state.refill_hidden[batch_idx] = state.refill_incoming.pop(batch_idx).result()
        with span(f"wait load {label}", "wait"):
            loaded: LoadedWeights = walk.weight_loads[ops.LoadWeight(op.block_idx, op.token_idx, op.layer_idx)].result()
            past = walk.cache_loads.pop(ops.LoadCache(op.block_idx, op.token_idx, op.layer_idx, batch_idx), None)
            past: KVLease | None = past.result() if past is not None else None
        with span(f"compute {label}", "compute"):
            self._run_unit(op, walk, state, loaded.tensors, past)

    def _run_unit(self, op: ops.Compute, walk: Walk, state: BlockState, weights, past: KVLease | None) -> None:
        token_idx, batch_idx = op.token_idx, op.batch_idx
        unit = self.units[op.layer_idx]
        task = TaskKey(op.block_idx, token_idx, batch_idx)
        step = state.step(token_idx, batch_idx, self.device, self.spec.sliding_window, self.spec.local_window)
        refill = state.refill_rows(token_idx, batch_idx)  # new prompts in some rows: their prefill, same weights
        if unit.kind is UnitKind.EMBED:
            ids = state.input_ids(token_idx, batch_idx).to(self.device)
            state.hidden[batch_idx] = out = self.math.embed(weights, ids, step)
            if refill is not None:
                state.refill_hidden[batch_idx] = self.math.embed(weights, refill.ids.to(self.device), refill.step)
        elif unit.kind is UnitKind.BLOCK:
            kv = self.block_io.lease_for_compute(state, op.layer_idx, batch_idx, past)
            math = self.math.at(op.layer_idx - 1)  # decoder layer op.layer_idx - 1 (the embedding is unit 0)
            if refill is None:
                state.hidden[batch_idx] = out = decoder_layer(math, weights, state.hidden.pop(batch_idx), step, kv)
            else:  # the batch's decode step and the new prompts' prefill in one pass over the weights
                out, state.refill_hidden[batch_idx] = mixed_decoder_layer(
                    math, weights, state.hidden.pop(batch_idx), step, kv, state.refill_hidden.pop(batch_idx),
                    refill.step, refill.rows, refill.slots)
                state.hidden[batch_idx] = out
        else:  # the head, always a stage's last layer
            x = state.hidden.pop(batch_idx)
            if refill is not None:  # the new prompts' last positions beside the batch's rows: one matmul
                x = torch.cat([x, state.refill_hidden.pop(batch_idx)[:, -1:]])
            logits = self.math.head(weights, x, step)  # (B [+ R], T, V)
            if refill is not None:
                logits, started = logits[:-len(refill.rows)], logits[-len(refill.rows):]
                logits[refill.rows.to(logits.device), -1] = started[:, -1]
            # sampling waits for the logits anyway: read the flags now, before NaN is sampled
            walk.finite.note(task, op.layer_idx, logits)
            walk.finite.task_done(task, read_now=True)
            if not step.last_only:
                state.record_scores(batch_idx, logits)
            seq_ids = state.block.seq_ids[state.rows(batch_idx)]
            state.record_tokens(token_idx, batch_idx, walk.sampler(logits[:, -1], seq_ids))
            state.forget_step(token_idx, batch_idx)  # this token's step inputs are not needed again
            return
        walk.finite.note(task, op.layer_idx, out)
        if op.layer_idx == walk.stage.layers[-1]:
            state.forget_step(token_idx, batch_idx)
            walk.finite.task_done(task, read_now=False)

    def _describe(self, layer_idx: int) -> str:
        kind = self.units[layer_idx].kind.value
        return {"embed": "the embedding", "head": "the head"}.get(kind, f"decoder layer {layer_idx - 1}")

    def _traced(self, name: str, cat: str, fn, *args):
        """fn(*args) inside a trace span, on whichever thread runs it."""
        with self.tracer.span(name, cat):
            return fn(*args)
