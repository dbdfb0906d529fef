"""The engine: walks a block's schedule, the one place where tiers, model math and I/O meet.

Loads (weights, KV cache) run on a small thread pool when `policy.overlap` is on, so the next
layer's weights and the next batch's cache arrive while the current batch computes; with
`overlap=False` every op runs inline in schedule order. Both give identical tokens.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model import Step, Unit
from ..planning.policy import Policy, choose_tiers
from ..planning.spec import ModelSpec
from ..schedule.block import (
    BlockShape,
    Compute,
    FreeWeight,
    LoadActivation,
    LoadCache,
    LoadWeight,
    StoreActivation,
    StoreCache,
    block_schedule,
)
from ..storage.tiers import DiskTensor, MemoryTensor, to_compute
from ..storage.weights import WeightStore
from .sampling import Sampler


@dataclass
class Block:
    """The sequences computed together: `num_gpu_batches` x `gpu_batch_size` rows, left padded."""

    input_ids: torch.Tensor  # (B, P) long
    prompt_mask: torch.Tensor  # (B, P) bool, False on left padding
    seq_ids: list[int]  # prompt index of each row; -1 for rows that only pad the block
    max_new_tokens: int
    stop_ids: frozenset[int]


@dataclass
class BlockResult:
    tokens: list[list[int]]  # per row: generated ids, up to and including a stop id
    prefill_s: float
    decode_s: float
    steps: int  # decode steps run (may stop early when every row has stopped)


class _Done:
    """Immediately available value with a Future's `result()`."""

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
    caches: dict[tuple[int, int], tuple] = field(default_factory=dict)  # (layer, batch) -> (k, v) tier tensors
    acts: dict[int, object] = field(default_factory=dict)  # batch -> hidden (tensor or DiskTensor)
    act_len: dict[int, int] = field(default_factory=dict)
    new_kv: dict[tuple[int, int], tuple] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    steps: dict[tuple[int, int], Step] = field(default_factory=dict)


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
    ):
        self.spec = spec
        self.units = units
        self.weights = weights
        self.math = math
        self.policy = policy
        self.device = device
        self.dtype = compute_dtype
        self.offload_dir = offload_dir
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flexgen-io") if policy.overlap else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def _submit(self, fn, *args):
        if self.pool is None:
            return _Done(fn(*args))
        return self.pool.submit(fn, *args)

    # --- block set-up -------------------------------------------------------------------------
    def _rows(self, batch_idx: int) -> slice:
        gbs = self.policy.gpu_batch_size
        return slice(batch_idx * gbs, (batch_idx + 1) * gbs)

    def _allocate(self, state: _BlockState, cache_dir: Path | None) -> None:
        s, p = self.spec, self.policy
        S = state.valid.shape[1]
        P = state.block.input_ids.shape[1]
        shape = (S, p.gpu_batch_size, s.num_kv_heads, s.head_dim)  # (seq, batch, kv heads, head dim)
        cache_tiers = choose_tiers([1] * (2 * p.num_gpu_batches), p.percents("cache"))
        for unit in self.units:
            if not unit.has_cache:
                continue
            for k in range(p.num_gpu_batches):
                pair = []
                for which, tier in zip("kv", cache_tiers[2 * k : 2 * k + 2]):
                    if tier == "disk":
                        path = cache_dir / f"layer{unit.layer_idx}_batch{k}_{which}.bin"
                        pair.append(DiskTensor(path, shape, self.dtype))
                    else:
                        dev = self.device if tier == "gpu" else torch.device("cpu")
                        pair.append(MemoryTensor.empty(shape, self.dtype, dev, tier))
                state.caches[(unit.layer_idx, k)] = tuple(pair)
        act_tiers = choose_tiers([1] * p.num_gpu_batches, p.percents("act"))
        for k, tier in enumerate(act_tiers):
            if tier == "disk":
                path = cache_dir / f"act_batch{k}.bin"
                state.acts[k] = DiskTensor(path, (P, p.gpu_batch_size, s.hidden_size), self.dtype)
            else:
                state.acts[k] = tier  # filled with the hidden state itself, on its tier's device

    def _needs_disk(self) -> bool:
        return self.policy.percents("cache")[2] > 0 or self.policy.percents("act")[2] > 0

    # --- per-step inputs ----------------------------------------------------------------------
    def _query_slots(self, state: _BlockState, token_idx: int) -> slice:
        P = state.block.input_ids.shape[1]
        return slice(0, P) if token_idx == 0 else slice(P + token_idx - 1, P + token_idx)

    def _step(self, state: _BlockState, token_idx: int, batch_idx: int) -> Step:
        key = (token_idx, batch_idx)
        if key not in state.steps:
            rows, q = self._rows(batch_idx), self._query_slots(state, token_idx)
            end = q.stop
            q_idx = torch.arange(q.start, q.stop)[:, None]  # (T, 1)
            k_idx = torch.arange(0, end)[None, :]  # (1, S)
            allowed = k_idx <= q_idx
            if self.spec.sliding_window:
                allowed &= (q_idx - k_idx) < self.spec.sliding_window
            mask = state.valid[rows, None, None, :end] & allowed  # (B, 1, T, S)
            # A padding slot attends to itself, so no row is fully masked (which would give NaN).
            mask |= k_idx == q_idx
            state.steps[key] = Step(
                positions=state.positions[rows, q].to(self.device),
                mask=mask.to(self.device),
            )
        return state.steps[key]

    # --- ops ----------------------------------------------------------------------------------
    def _load_cache(self, state: _BlockState, token_idx: int, layer_idx: int, batch_idx: int):
        past = slice(0, self._query_slots(state, token_idx).start)
        out = []
        for t in state.caches[(layer_idx, batch_idx)]:
            x = to_compute(t, past, self.device, self.dtype)  # (S, B, nkv, hd)
            out.append(x.permute(1, 2, 0, 3))  # (B, nkv, S, hd)
        return tuple(out)

    def _store_cache(self, state: _BlockState, token_idx: int, layer_idx: int, batch_idx: int) -> None:
        q = self._query_slots(state, token_idx)
        new = state.new_kv.pop((layer_idx, batch_idx))
        for t, x in zip(state.caches[(layer_idx, batch_idx)], new):
            t.write(q, x.permute(2, 0, 1, 3))  # (B, nkv, T, hd) -> (T, B, nkv, hd)

    def _store_act(self, state: _BlockState, batch_idx: int) -> None:
        x = state.hidden.pop(batch_idx)  # (B, T, C)
        home = state.acts[batch_idx]
        if isinstance(home, DiskTensor):
            home.write(slice(0, x.shape[1]), x.transpose(0, 1))  # (T, B, C)
            state.act_len[batch_idx] = x.shape[1]
        elif home == "cpu" and self.device.type != "cpu":
            state.hidden[batch_idx] = x.to("cpu", non_blocking=True)
        else:
            state.hidden[batch_idx] = x

    def _load_act(self, state: _BlockState, batch_idx: int) -> torch.Tensor:
        home = state.acts[batch_idx]
        if isinstance(home, DiskTensor):
            x = to_compute(home, slice(0, state.act_len[batch_idx]), self.device, self.dtype)
            return x.transpose(0, 1)  # (B, T, C)
        return state.hidden.pop(batch_idx).to(self.device)

    def _compute(self, state, op: Compute, weights, past, x) -> None:
        t, j, k = op.token_idx, op.layer_idx, op.batch_idx
        unit = self.units[j]
        step = self._step(state, t, k)
        rows = self._rows(k)
        if unit.kind == "embed":
            ids = state.block.input_ids[rows] if t == 0 else state.tokens[rows, t - 1 : t]
            state.hidden[k] = self.math.embed(weights, ids.to(self.device), step)
        elif unit.kind == "block":
            past_k, past_v = past if past is not None else (None, None)
            h, k_new, v_new = self.math.block(weights, x, step, past_k, past_v)
            state.hidden[k] = h
            state.new_kv[(j, k)] = (k_new, v_new)
        else:
            logits = self.math.head(weights, x, step)[:, -1]  # (B, V)
            seq_ids = state.block.seq_ids[rows]
            next_ids = self.sampler(logits, seq_ids)
            done = state.done[rows]
            next_ids = torch.where(done, torch.zeros_like(next_ids), next_ids)
            state.tokens[rows, t] = next_ids
            stop = torch.tensor([int(i) in state.block.stop_ids for i in next_ids.tolist()], dtype=torch.bool)
            state.done[rows] = done | stop
            # Drop this token's step inputs: they are not needed again.
            state.steps.pop((t, k), None)

    # --- one block ----------------------------------------------------------------------------
    def run_block(self, block: Block, sampler: Sampler) -> BlockResult:
        self.sampler = sampler
        B, P = block.input_ids.shape
        T = block.max_new_tokens
        S = P + T
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[:, :P] = block.prompt_mask
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        state = _BlockState(
            block=block,
            valid=valid,
            positions=positions,
            tokens=torch.zeros(B, T, dtype=torch.long),
            done=torch.tensor([seq_id < 0 for seq_id in block.seq_ids], dtype=torch.bool),
        )
        cache_dir = None
        if self._needs_disk():
            Path(self.offload_dir).mkdir(parents=True, exist_ok=True)
            cache_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=self.offload_dir))
        shape = BlockShape(
            num_tokens=T,
            num_layers=len(self.units),
            num_batches=self.policy.num_gpu_batches,
            cache_layers=frozenset(u.layer_idx for u in self.units if u.has_cache),
        )
        weight_futures: dict[tuple[int, int], Future] = {}
        cache_futures: dict[tuple[int, int, int], Future] = {}
        start = time.perf_counter()
        prefill_s = None
        steps_run = T
        try:
            self._allocate(state, cache_dir)
            current_token = 0
            for op in block_schedule(shape):
                if isinstance(op, Compute) and op.token_idx != current_token:
                    current_token = op.token_idx
                    if prefill_s is None:
                        self._sync()
                        prefill_s = time.perf_counter() - start
                    if bool(state.done.all()):
                        steps_run = current_token
                        break
                if isinstance(op, LoadWeight):
                    weight_futures[(op.token_idx, op.layer_idx)] = self._submit(self.weights.load, op.layer_idx)
                elif isinstance(op, FreeWeight):
                    weight_futures.pop((op.token_idx, op.layer_idx))
                elif isinstance(op, LoadCache):
                    key = (op.token_idx, op.layer_idx, op.batch_idx)
                    cache_futures[key] = self._submit(self._load_cache, state, *key)
                elif isinstance(op, StoreCache):
                    self._store_cache(state, op.token_idx, op.layer_idx, op.batch_idx)
                elif isinstance(op, StoreActivation):
                    self._store_act(state, op.batch_idx)
                elif isinstance(op, LoadActivation):
                    state.hidden[op.batch_idx] = self._load_act(state, op.batch_idx)
                elif isinstance(op, Compute):
                    weights = weight_futures[(op.token_idx, op.layer_idx)].result()
                    past_future = cache_futures.pop((op.token_idx, op.layer_idx, op.batch_idx), None)
                    past = past_future.result() if past_future is not None else None
                    x = state.hidden.pop(op.batch_idx, None)
                    self._compute(state, op, weights, past, x)
            self._sync()
        finally:
            for fut in list(weight_futures.values()) + list(cache_futures.values()):
                fut.result()  # let in-flight reads finish before their files go away
            if cache_dir is not None:
                shutil.rmtree(cache_dir, ignore_errors=True)
        total = time.perf_counter() - start
        if prefill_s is None:
            prefill_s = total
        tokens = []
        for row in range(B):
            out = []
            for tok in state.tokens[row, :steps_run].tolist():
                out.append(tok)
                if tok in block.stop_ids:
                    break
            tokens.append(out)
        return BlockResult(tokens=tokens, prefill_s=prefill_s, decode_s=total - prefill_s, steps=steps_run)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
