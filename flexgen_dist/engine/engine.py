"""The engine: walks this rank's schedule, the one place where tiers, model math and
communication meet.

Loads (weights, KV cache) run on a small thread pool when `policy.overlap` is on, so the next
layer's weights and the next batch's cache arrive while the current batch computes; with
`overlap=False` every load runs inline in schedule order. Both give identical tokens. With
several ranks, hidden states and sampled tokens move through `comm` (see parallel/comm.py).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..model import Step, Unit, prefill_layer
from ..model.layers import attention
from ..planning.policy import Policy, choose_tiers
from ..planning.spec import ModelSpec
from ..schedule import block as ops_
from ..schedule.pipeline import pipeline_groups, remaining_groups
from ..storage.tiers import BufferPool, DiskTensor, MemoryTensor, ReadBuffers, to_compute
from ..storage.weights import WeightStore
from .sampling import Sampler
from .trace import NoTracer

TAG_ACTIVATION, TAG_TOKENS = 1, 2


@dataclass
class Block:
    """The sequences computed together: `num_gpu_batches` x `gpu_batch_size` rows, left padded."""

    input_ids: torch.Tensor  # (B, P) long
    prompt_mask: torch.Tensor  # (B, P) bool, False on left padding
    seq_ids: list[int]  # prompt index of each row; -1 for rows that only pad the block
    max_new_tokens: int
    stop_ids: frozenset[int]
    score: bool = False  # also compute each prompt token's log-probability (perplexity)


@dataclass
class BlockResult:
    tokens: list[list[int]]  # per row: generated ids, up to and including a stop id
    scores: list[list[float]] | None = None  # per row: log p(token i | tokens < i) for i >= 1


@dataclass
class RunResult:
    blocks: list[BlockResult]  # meaningful on the first stage only
    prefill_s: float  # wall time in prefill tasks (token 0), waits included
    decode_s: float


@dataclass(frozen=True)
class _KVBuffers:
    """Keys and values of one (layer, batch) for a decode step, laid out (S, B, nkv, hd) with
    room for this step's rows: attention writes the new rows and reads the prefix in place.

    in_place: they are the cache itself (a memory tier), so attention's write is the store.
    Otherwise they are scratch copies (from disk, or host memory on a GPU machine) from the
    engine's pool, and StoreCache writes the new rows to the cache's tier.
    on_host: attention runs on the CPU over a host-memory cache (cpu_cache_compute on a GPU)."""

    k: torch.Tensor
    v: torch.Tensor
    in_place: bool
    on_host: bool = False


class _Ready:
    """An already available value with a Future's `result()`."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


@dataclass
class _BlockState:
    block: Block
    valid: torch.Tensor  # (B, S) bool: slot holds a real token
    positions: torch.Tensor  # (B, S) long
    tokens: torch.Tensor  # (B, T) long, generated ids
    done: torch.Tensor  # (B,) bool
    scores: dict[int, list[float]] = field(default_factory=dict)  # row -> prompt token log-probs
    scratch: Path | None = None  # this block's disk-tier cache and activation files
    caches: dict[tuple[int, int], tuple] = field(default_factory=dict)  # (layer, batch) -> (k, v)
    act_homes: dict[int, object] = field(default_factory=dict)  # batch -> tier name or DiskTensor
    act_len: dict[int, int] = field(default_factory=dict)
    new_kv: dict[tuple[int, int], tuple] = field(default_factory=dict)
    hidden: dict[int, object] = field(default_factory=dict)  # batch -> tensor or pending receive
    steps: dict[tuple[int, int], Step] = field(default_factory=dict)


@dataclass
class _Run:
    """Everything one `Engine.run` call tracks while it walks the plan."""

    blocks: list[Block]
    groups: list[list[tuple[int, int]]]
    stage: ops_.StageShape
    last_task: dict[int, tuple[int, int]]  # block -> its last (block, token) task
    states: dict[int, _BlockState] = field(default_factory=dict)  # open blocks
    results: dict[int, BlockResult] = field(default_factory=dict)  # closed blocks
    futures: dict[object, object] = field(default_factory=dict)  # load op -> future
    pending_sends: list = field(default_factory=list)
    phase_s: list[float] = field(default_factory=lambda: [0.0, 0.0])  # prefill, decode

    def state(self, engine: "Engine", block_idx: int) -> _BlockState:
        if block_idx not in self.states:
            self.states[block_idx] = engine._open_block(self.blocks[block_idx])
        return self.states[block_idx]

    def close(self, engine: "Engine", block_idx: int) -> None:
        self.results[block_idx] = engine._close_block(self.states.pop(block_idx))


class Engine:
    def __init__(
        self,
        spec: ModelSpec,
        units: list[Unit],
        weights: WeightStore,
        math,
        policy: Policy,
        device: torch.device,
        compute_dtype: torch.dtype,
        offload_dir: str | Path | None,
        comm=None,
        tracer=None,
        prefetch_depth: int = 1,
    ):
        self.spec = spec
        self.units = units  # this rank's schedule layers, in order
        self.weights = weights
        self.math = math
        self.policy = policy
        self.device = device
        self.dtype = compute_dtype
        self.offload_dir = offload_dir
        self.comm = comm
        self.tracer = tracer if tracer is not None else NoTracer()
        self.rank = comm.rank if comm is not None else 0
        self.num_ranks = comm.world_size if comm is not None else 1
        if prefetch_depth < 1:
            raise UserError(f"prefetch depth must be >= 1, got {prefetch_depth}")
        self.prefetch_depth = prefetch_depth
        workers = prefetch_depth + 1  # weight loads in flight, plus the next batch's cache
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="flexgen-io") if policy.overlap else None
        self._streams = threading.local()
        self._read_buffers = ReadBuffers()  # disk-tier cache and activation reads
        self._kv_pool = BufferPool(device, compute_dtype)  # scratch KV buffers for caches not on the device

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def _submit(self, fn, *args):
        if self.pool is None:
            return _Ready(fn(*args))
        if self.device.type == "cuda":
            return self.pool.submit(self._on_load_stream, fn, *args)
        return self.pool.submit(fn, *args)

    def _on_load_stream(self, fn, *args):
        """On a GPU, each I/O thread copies on its own CUDA stream, so host-to-device transfers
        overlap the compute stream; the result is handed over once its stream has finished."""
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            out = fn(*args)
        stream.synchronize()
        return out

    def _rows(self, batch_idx: int) -> slice:
        gbs = self.policy.gpu_batch_size
        return slice(batch_idx * gbs, (batch_idx + 1) * gbs)

    # --- block set-up and tear-down ------------------------------------------------------------
    def _open_block(self, block: Block) -> _BlockState:
        B, P = block.input_ids.shape
        S = P + block.max_new_tokens
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[:, :P] = block.prompt_mask
        state = _BlockState(
            block=block,
            valid=valid,
            positions=(valid.long().cumsum(-1) - 1).clamp(min=0),
            tokens=torch.zeros(B, block.max_new_tokens, dtype=torch.long),
            done=torch.tensor([seq_id < 0 for seq_id in block.seq_ids], dtype=torch.bool),
        )
        s, p = self.spec, self.policy
        if p.percents("cache")[2] > 0 or p.percents("act")[2] > 0:
            Path(self.offload_dir).mkdir(parents=True, exist_ok=True)
            state.scratch = Path(tempfile.mkdtemp(prefix=f"cache-rank{self.rank}-", dir=self.offload_dir))
        shape = (S, p.gpu_batch_size, s.num_kv_heads, s.head_dim)  # (seq, batch, kv heads, head dim)
        cache_tiers = choose_tiers([1] * (2 * p.num_gpu_batches), p.percents("cache"))
        for j, unit in enumerate(self.units):
            if not unit.has_cache:
                continue
            for k in range(p.num_gpu_batches):
                pair = []
                for which, tier in zip("kv", cache_tiers[2 * k : 2 * k + 2]):
                    if tier == "disk":
                        path = state.scratch / f"layer{unit.layer_idx}_batch{k}_{which}.bin"
                        pair.append(DiskTensor(path, shape, self.dtype, buffers=self._read_buffers))
                    else:
                        dev = self.device if tier == "gpu" else torch.device("cpu")
                        pin = tier == "cpu" and self.device.type == "cuda"  # async host-to-device copies
                        pair.append(MemoryTensor.empty(shape, self.dtype, dev, tier, pin=pin))
                state.caches[(j, k)] = tuple(pair)
        for k, tier in enumerate(choose_tiers([1] * p.num_gpu_batches, p.percents("act"))):
            if tier == "disk":
                path = state.scratch / f"act_batch{k}.bin"
                state.act_homes[k] = DiskTensor(path, (P, p.gpu_batch_size, s.hidden_size), self.dtype, buffers=self._read_buffers)
            else:
                state.act_homes[k] = tier
        return state

    def _close_block(self, state: _BlockState) -> BlockResult:
        if state.scratch is not None:
            shutil.rmtree(state.scratch, ignore_errors=True)
        tokens = []
        for row in range(state.tokens.shape[0]):
            out = []
            for tok in state.tokens[row].tolist():
                out.append(tok)
                if tok in state.block.stop_ids:
                    break
            tokens.append(out)
        scores = [state.scores[row] for row in range(len(tokens))] if state.block.score else None
        return BlockResult(tokens, scores)

    # --- per-step inputs ------------------------------------------------------------------------
    def _query_slots(self, state: _BlockState, token_idx: int) -> slice:
        P = state.block.input_ids.shape[1]
        return slice(0, P) if token_idx == 0 else slice(P + token_idx - 1, P + token_idx)

    def _step(self, state: _BlockState, token_idx: int, batch_idx: int) -> Step:
        key = (token_idx, batch_idx)
        if key not in state.steps:
            rows, q = self._rows(batch_idx), self._query_slots(state, token_idx)
            q_idx = torch.arange(q.start, q.stop)[:, None]  # (T, 1)
            k_idx = torch.arange(0, q.stop)[None, :]  # (1, S)
            allowed = k_idx <= q_idx
            if self.spec.sliding_window:
                allowed &= (q_idx - k_idx) < self.spec.sliding_window
            mask = state.valid[rows, None, None, : q.stop] & allowed  # (B, 1, T, S)
            mask |= k_idx == q_idx  # a padding slot attends to itself: no fully masked row, no NaN
            state.steps[key] = Step(
                positions=state.positions[rows, q].to(self.device),
                mask=mask.to(self.device),
                last_only=not (state.block.score and token_idx == 0),
            )
        return state.steps[key]

    # --- loads and stores -----------------------------------------------------------------------
    def _load_cache(self, state: _BlockState, token_idx: int, layer_idx: int, batch_idx: int) -> _KVBuffers:
        pair = state.caches[(layer_idx, batch_idx)]
        if all(isinstance(t, MemoryTensor) and t.data.device == self.device for t in pair):
            return _KVBuffers(pair[0].data, pair[1].data, in_place=True)  # the gpu tier: use it where it is
        if self.policy.cpu_cache_compute and all(t.tier == "cpu" for t in pair):
            return _KVBuffers(pair[0].data, pair[1].data, in_place=True, on_host=True)  # attention comes to the cache
        past = self._query_slots(state, token_idx).start
        scratch = []
        for t in pair:
            buf = self._kv_pool.take(t.shape)  # (S, B, nkv, hd)
            if isinstance(t, DiskTensor):
                t.read_into(buf, rows=past)
            else:
                buf[:past].copy_(t.data[:past], non_blocking=t.data.is_pinned())
            scratch.append(buf)
        return _KVBuffers(scratch[0], scratch[1], in_place=False)

    def _store_cache(self, state: _BlockState, op: ops_.StoreCache) -> None:
        q = self._query_slots(state, op.token_idx)
        new = state.new_kv.pop((op.layer_idx, op.batch_idx))
        if new is None:
            return  # attention already wrote this step's keys and values into the cache
        for t, x in zip(state.caches[(op.layer_idx, op.batch_idx)], new):
            t.write(q, x.permute(2, 0, 1, 3))  # (B, nkv, T, hd) -> (T, B, nkv, hd)

    def _store_act(self, state: _BlockState, batch_idx: int) -> None:
        x = state.hidden.pop(batch_idx)  # (B, T, C)
        home = state.act_homes[batch_idx]
        if isinstance(home, DiskTensor):
            home.write(slice(0, x.shape[1]), x.transpose(0, 1))  # (T, B, C)
            state.act_len[batch_idx] = x.shape[1]
        elif home == "cpu" and self.device.type != "cpu":
            state.hidden[batch_idx] = x.to("cpu", non_blocking=True)
        else:
            state.hidden[batch_idx] = x

    def _load_act(self, state: _BlockState, batch_idx: int) -> None:
        home = state.act_homes[batch_idx]
        if isinstance(home, DiskTensor):
            x = to_compute(home, slice(0, state.act_len[batch_idx]), self.device, self.dtype)
            state.hidden[batch_idx] = x.transpose(0, 1)  # (B, T, C)
        else:
            state.hidden[batch_idx] = state.hidden[batch_idx].to(self.device)

    def _record_tokens(self, state: _BlockState, token_idx: int, batch_idx: int, ids: torch.Tensor) -> None:
        rows = self._rows(batch_idx)
        done = state.done[rows]
        ids = torch.where(done, torch.zeros_like(ids), ids)
        state.tokens[rows, token_idx] = ids
        stop = torch.tensor([int(i) in state.block.stop_ids for i in ids.tolist()], dtype=torch.bool)
        state.done[rows] = done | stop

    def _record_scores(self, state: _BlockState, batch_idx: int, logits: torch.Tensor) -> None:
        rows = self._rows(batch_idx)
        ids = state.block.input_ids[rows].to(logits.device)  # (B, P)
        mask = state.block.prompt_mask[rows]
        for i in range(logits.shape[0]):  # row by row: a (P, V) log-softmax at a time
            logp = logits[i, :-1].log_softmax(-1).gather(-1, ids[i, 1:, None])[:, 0].cpu()  # (P - 1,)
            both_real = mask[i, :-1] & mask[i, 1:]
            state.scores[rows.start + i] = logp[both_real].tolist()

    # --- compute --------------------------------------------------------------------------------
    def _compute(self, state: _BlockState, op: ops_.Compute, weights, past) -> None:
        t, j, k = op.token_idx, op.layer_idx, op.batch_idx
        unit = self.units[j]
        step = self._step(state, t, k)
        rows = self._rows(k)
        if unit.kind == "embed":
            ids = state.block.input_ids[rows] if t == 0 else state.tokens[rows, t - 1 : t]
            state.hidden[k] = self.math.embed(weights, ids.to(self.device), step)
            return
        x = state.hidden.pop(k)
        if unit.kind == "block" and past is not None:
            state.hidden[k], new = self._decode_layer(state, t, weights, x, step, past)
            state.new_kv[(j, k)] = new
        elif unit.kind == "block":  # the prefill: no past
            h, k_new, v_new = prefill_layer(self.math, weights, x, step)
            state.hidden[k] = h
            state.new_kv[(j, k)] = (k_new, v_new)
        else:
            logits = self.math.head(weights, x, step)  # (B, T, V)
            if not step.last_only:
                self._record_scores(state, k, logits)
            self._record_tokens(state, t, k, self.sampler(logits[:, -1], state.block.seq_ids[rows]))
        if j == len(self.units) - 1:
            state.steps.pop((t, k), None)  # this token's step inputs are not needed again

    def _decode_layer(self, state, token_idx, weights, x, step: Step, kv: _KVBuffers):
        """A decode step of one layer over KV buffers that take this step's rows in place: no
        copy of the past. Returns the hidden state and what StoreCache must still write (None
        when the buffers are the cache itself)."""
        q, k_new, v_new = self.math.qkv(weights, x, step)  # (B, nh, 1, hd), (B, nkv, 1, hd)
        slots = self._query_slots(state, token_idx)
        where = torch.device("cpu") if kv.on_host else self.device
        kv.k[slots] = k_new.permute(2, 0, 1, 3)  # (1, B, nkv, hd): only the new rows move
        kv.v[slots] = v_new.permute(2, 0, 1, 3)
        keys = kv.k[: slots.stop].permute(1, 2, 0, 3)  # (B, nkv, S, hd), a view
        values = kv.v[: slots.stop].permute(1, 2, 0, 3)
        a = attention(q.to(where, keys.dtype), keys, values, step.mask.to(where), self.math.scale)  # (B, 1, nh * hd)
        h = self.math.finish(weights, x, a.to(self.device, x.dtype))
        if kv.in_place:
            return h, None
        self._kv_pool.give((kv.k, kv.v))
        return h, (k_new, v_new)

    # --- the walk -------------------------------------------------------------------------------
    def run(self, blocks: list[Block], sampler: Sampler) -> RunResult:
        """Run every block through this rank's layers; blocks must be the same on every rank."""
        self.sampler = sampler
        stage = ops_.StageShape(
            num_layers=len(self.units),
            num_batches=self.policy.num_gpu_batches,
            cache_layers=frozenset(j for j, u in enumerate(self.units) if u.has_cache),
            rank=self.rank,
            num_ranks=self.num_ranks,
        )
        groups = pipeline_groups(len(blocks), blocks[0].max_new_tokens, self.num_ranks)
        run = _Run(blocks, groups, stage, last_task={b: (b, t) for group in groups for b, t in group})
        try:
            plan = ops_.rank_schedule(groups, stage, self.prefetch_depth)
            while plan:
                plan = self._walk(plan, run)
            for handle in run.pending_sends:
                handle.wait()
        finally:
            for fut in list(run.futures.values()):
                try:
                    fut.result()  # let in-flight reads finish before their files go away
                except Exception:
                    pass
            for state in run.states.values():
                self._close_block(state)
        return RunResult([run.results.get(b, BlockResult([])) for b in range(len(blocks))], *run.phase_s)

    def _walk(self, plan: list, run: _Run) -> list:
        """Execute ops in order; returns a new plan when a block finished early (single rank), else []."""
        current = None
        started = time.perf_counter()
        for op in plan:
            if isinstance(op, ops_.Compute) and (op.block_idx, op.token_idx) != current:
                now = time.perf_counter()
                if current is not None:
                    run.phase_s[current[1] > 0] += now - started
                started, current = now, (op.block_idx, op.token_idx)
                if self.num_ranks == 1 and op.token_idx > 0 and bool(run.state(self, op.block_idx).done.all()):
                    # Every row stopped: drop the rest of this block and re-plan what remains.
                    for key in [k for k in run.futures if k.block_idx == op.block_idx]:
                        loaded = run.futures.pop(key).result()
                        if isinstance(key, ops_.LoadWeight):
                            self.weights.release(loaded)
                    run.close(self, op.block_idx)
                    remaining = remaining_groups(run.groups, {op.block_idx}, current)
                    return ops_.rank_schedule(remaining, run.stage, self.prefetch_depth)
            self._execute(op, run)
            if run.last_task[op.block_idx] != (op.block_idx, op.token_idx):
                continue
            # The block's last task on this rank: close it after its last op.
            last_layer_done = isinstance(op, ops_.FreeWeight) and op.layer_idx == len(self.units) - 1
            if last_layer_done and (self.num_ranks == 1 or not run.stage.is_first):
                run.close(self, op.block_idx)
            if isinstance(op, ops_.RecvTokens) and op.batch_idx == self.policy.num_gpu_batches - 1:
                run.close(self, op.block_idx)  # the first stage: once the final tokens are back
        if current is not None:
            self._sync()
            run.phase_s[current[1] > 0] += time.perf_counter() - started
        return []

    def _traced(self, name: str, cat: str, fn, *args):
        """fn(*args) inside a trace span, on whichever thread runs it."""
        with self.tracer.span(name, cat):
            return fn(*args)

    def _execute(self, op, run: _Run) -> None:
        futures, pending_sends = run.futures, run.pending_sends
        if isinstance(op, ops_.LoadWeight):
            name = f"load weight L{self.units[op.layer_idx].layer_idx} (block {op.block_idx}, token {op.token_idx})"
            futures[op] = self._submit(self._traced, name, "load", self.weights.load, self.units[op.layer_idx].layer_idx)
            return
        if isinstance(op, ops_.FreeWeight):
            self.weights.release(futures.pop(ops_.LoadWeight(op.block_idx, op.token_idx, op.layer_idx)).result())
            return
        state = run.state(self, op.block_idx)
        where = f"L{self.units[op.layer_idx].layer_idx} " if hasattr(op, "layer_idx") else ""
        label = f"{where}batch {getattr(op, 'batch_idx', '-')} (block {op.block_idx}, token {op.token_idx})"
        span = self.tracer.span
        if isinstance(op, ops_.LoadCache):
            futures[op] = self._submit(self._traced, f"load cache {label}", "load", self._load_cache, state, op.token_idx, op.layer_idx, op.batch_idx)
        elif isinstance(op, ops_.Compute):
            pending = state.hidden.get(op.batch_idx)
            if pending is not None and not isinstance(pending, torch.Tensor):  # input from the previous stage
                with span(f"recv activation wait {label}", "recv"):
                    state.hidden[op.batch_idx] = pending.result().to(self.device, self.dtype)
            with span(f"wait load {label}", "wait"):
                weights = futures[ops_.LoadWeight(op.block_idx, op.token_idx, op.layer_idx)].result()
                past = futures.pop(ops_.LoadCache(op.block_idx, op.token_idx, op.layer_idx, op.batch_idx), None)
                past = past.result() if past is not None else None
            with span(f"compute {label}", "compute"):
                self._compute(state, op, weights, past)
        elif isinstance(op, ops_.StoreCache):
            with span(f"store cache {label}", "store"):
                self._store_cache(state, op)
        elif isinstance(op, ops_.StoreActivation):
            with span(f"store activation {label}", "store"):
                self._store_act(state, op.batch_idx)
        elif isinstance(op, ops_.LoadActivation):
            with span(f"load activation {label}", "load"):
                self._load_act(state, op.batch_idx)
        elif isinstance(op, ops_.SendActivation):
            with span(f"send activation {label} to rank {op.dst}", "send"):
                pending_sends.append(self.comm.send(state.hidden.pop(op.batch_idx), op.dst, TAG_ACTIVATION))
        elif isinstance(op, ops_.RecvActivation):
            width = state.block.input_ids.shape[1] if op.token_idx == 0 else 1
            shape = (self.policy.gpu_batch_size, width, self.spec.hidden_size)
            with span(f"recv activation {label} from rank {op.src}", "recv"):
                state.hidden[op.batch_idx] = self.comm.recv(shape, self.dtype, op.src, TAG_ACTIVATION)
        elif isinstance(op, ops_.SendTokens):
            ids = state.tokens[self._rows(op.batch_idx), op.token_idx].clone()
            with span(f"send tokens {label} to rank {op.dst}", "send"):
                pending_sends.append(self.comm.send(ids, op.dst, TAG_TOKENS))
        elif isinstance(op, ops_.RecvTokens):
            with span(f"recv tokens {label} from rank {op.src}", "recv"):
                ids = self.comm.recv((self.policy.gpu_batch_size,), torch.long, op.src, TAG_TOKENS).result()
            self._record_tokens(state, op.token_idx, op.batch_idx, ids)
        else:
            raise TypeError(f"unknown op {op!r}")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
