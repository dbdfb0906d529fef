"""A block's KV caches and activations on their tiers, and moving them for compute.

Opening a block allocates, as the placement says, each (layer, batch) KV cache on its tier (in
the block's slot of that tier's pool; files on disk; quantized when the cache is compressed) and
each GPU batch's activation home. For a compute, `lease_for_compute` hands the layer a KV view
(engine/kv_views.py): the cache itself where attention can read it in place (the compute device's
memory, or host memory with CPU attention), else a scratch pair from a fixed pool into which
`load_cache` copied (and dequantized) the past; `store_cache` then writes the step's new rows from
the scratch to the cache's tier and gives the scratch back. Activations between layers wait on
their batch's tier (`store_act` / `load_act`).
"""

from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from ..errors import file_error
from ..files import remove_stale_temps
from ..model import KVView
from ..planning.compression import cache_quantized_shape
from ..planning.placement import CachePlace, Placement, Tier
from ..planning.tiers import cache_part_rows
from ..storage.slots import SlotPool, StreamOrder
from ..storage.tiers import DiskReader, DiskTensor, MemoryTensor, TierTensor, copy, layout_of, torch_dtype
from ..temp_names import temp_name
from .blocks import ActivationHome, Block, BlockResult, BlockState, KVCache, KVLease
from .kv_views import DenseKV, StoredKV


SCRATCH_NAME = "kv-cache"  # a block's scratch folder is temp_name(SCRATCH_NAME) in the offload folder


class BlockIO:
    def __init__(self, *, placement: Placement, device: torch.device, offload_dir: Path | None,
                 reader: DiskReader | None, rank: int):
        self.placement = placement
        self.device = device
        self.dtype = torch_dtype(placement.dtypes.compute)
        self.cache_dtype = torch_dtype(placement.cache_dtype)
        self.offload_dir = offload_dir
        self.reader = reader
        self.rank = rank
        self.spec = placement.spec
        self.order = StreamOrder(device)
        self.scratch: SlotPool | None = None  # KV scratch pairs
        self.cache_pools: dict[Tier, SlotPool] = {}  # a slot per open block on each memory tier
        self._swept = False  # the scratch folders of dead runs removed from offload_dir

    def resize(self, placement: Placement) -> None:
        """Use `placement` (the same tiers, sized for another workload) from the next run on. Only
        between runs: no block may be open."""
        if placement.workload.seq_len > self.placement.workload.seq_len:
            self.close_pools()  # sized for the longest sequence: rebuilt larger
        self.placement = placement

    def close_pools(self, check: bool = True) -> None:
        """Free the KV memory (after a run: an idle model holds only its weights). After a run that
        ended normally every slot must be back (`check`): one still lent is a leak, a bug to report
        rather than memory to lose quietly. After a failure the failure is what matters."""
        pools = [pool for pool in (self.scratch, *self.cache_pools.values()) if pool is not None]
        self.scratch, self.cache_pools = None, {}
        for pool in pools:
            pool.close()
        lent = [pool for pool in pools if pool.num_free != len(pool.slots)]
        if lent and check:
            raise RuntimeError(f"{len(lent)} KV pool(s) still had slots lent out at the end of a run")

    def _cache_pool(self, tier: Tier) -> SlotPool:
        if tier not in self.cache_pools:
            nbytes = self.placement.cache_layout(tier)[1]
            device = self.device if tier is Tier.GPU else torch.device("cpu")
            pin = self.device if tier is Tier.CPU and self.device.type == "cuda" else None  # async copies
            self.cache_pools[tier] = SlotPool(self.placement.blocks_in_flight, nbytes, device, pin=pin)
        return self.cache_pools[tier]

    # --- a block's life --------------------------------------------------------------------------
    def open(self, block: Block, start: Callable[[Block, int], BlockState] = BlockState.start) -> BlockState:
        """The block's state (`start(block, gpu_batch_size)`: engine/refill.py's for a block whose
        rows take new prompts), with its KV caches and activation homes on their tiers."""
        p = self.placement
        state = start(block, p.policy.gpu_batch_size)
        if self.placement.has_disk() and self.offload_dir is not None:
            try:
                state.scratch_dir = self._scratch_folder()
            except OSError as exc:
                raise file_error(exc, self.offload_dir, "create a folder in") from None
        rows = block.prompt_len + block.max_new_tokens
        shape = p.cache_shape(rows)  # (seq, batch, kv heads, head dim)
        config = p.policy.compression
        for tier in (Tier.GPU, Tier.CPU):
            pieces, nbytes = p.cache_layout(tier)
            if nbytes:
                state.cache_slots[tier] = slot = self._cache_pool(tier).take()
                for piece in pieces:
                    key = piece.name if piece.part == "value" else f"{piece.name}.{piece.part}"
                    # Where attention reads a cache in place (the compute device's memory; host
                    # memory too on a machine without a GPU) it is laid out heads-major.
                    heads_major = piece.part == "value" and (tier is Tier.GPU or self.device.type == "cpu")
                    piece_rows = rows if piece.part == "value" else cache_part_rows(piece.part, piece.name[-1], rows, config)
                    state.cache_views[key] = slot.heads_major_view(piece, rows) if heads_major else slot.view(piece, piece_rows)
        for key, place in p.caches.items():
            pair = [self._cache_tensor(state, place, which, tier, shape) for which, tier in (("k", place.k_tier), ("v", place.v_tier))]
            state.caches[key] = KVCache(pair[0], pair[1], place)
        for act in p.acts:
            state.acts[act.batch_idx] = self._act_home(state, act.batch_idx)
        return state

    def _act_home(self, state: BlockState, batch_idx: int, prefix: str = "") -> ActivationHome:
        """Where a GPU batch's hidden state waits between layers, on the placement's tier for it."""
        act = next(a for a in self.placement.acts if a.batch_idx == batch_idx)
        file = None
        if act.tier is Tier.DISK:
            path = state.scratch_dir / f"{prefix}act_batch{batch_idx}.bin"
            shape = (state.block.prompt_len, self.placement.policy.gpu_batch_size, self.spec.hidden_size)
            file = DiskTensor(path, shape, self.dtype, self.reader)
        return ActivationHome(act.tier, self.device, self.dtype, file)

    def _scratch_folder(self) -> Path:
        """A block's folder for its disk KV cache and activations: private (0o700), named as a
        temporary of this process (temp_names.temp_name: host, pid, random), so that a run killed with
        SIGKILL leaves a folder the next run in this offload folder can prove dead and remove."""
        folder = Path(self.offload_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if not self._swept:
            remove_stale_temps(folder, SCRATCH_NAME, folders=True)
            self._swept = True
        for _ in range(8):  # a fresh random name collides only with a planted one
            path = folder / temp_name(SCRATCH_NAME)
            try:
                os.mkdir(path, 0o700)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"no fresh scratch folder name in {folder}")

    def _cache_tensor(self, state: BlockState, place: CachePlace, which: str, tier: Tier, shape) -> TierTensor:
        config = self.placement.policy.compression
        kivi = place.compressed and config.cache_method == "kivi"
        valid = state.valid[state.rows(place.batch_idx)]  # (B, S), a view: the block updates it in place
        if place.compressed:  # only then are the compression modules imported
            from ..storage.kivi import kivi_in_memory, kivi_on_disk
            from ..storage.quantize import compressed_in_memory, compressed_on_disk
        if tier is Tier.DISK:
            path = state.scratch_dir / f"layer{place.layer_idx}_batch{place.batch_idx}_{which}"
            if kivi:
                return kivi_on_disk(which, path, shape, config, self.cache_dtype, self.reader, valid)
            if place.compressed:
                return compressed_on_disk(path, shape, config, self.reader)
            return DiskTensor(f"{path}.bin", shape, self.cache_dtype, self.reader)
        name = f"L{place.layer_idx}b{place.batch_idx}{which}"
        if kivi:
            views = {part: state.cache_views[f"{name}.{part}"] for part in ("data", "scale", "mins", "window")}
            return kivi_in_memory(which, views, shape, config, tier, valid)
        if place.compressed:
            parts = tuple(state.cache_views[f"{name}.{part}"] for part in ("data", "scale", "mins"))
            return compressed_in_memory(parts, shape, config, tier)
        return MemoryTensor(state.cache_views[name], tier)

    def close(self, state: BlockState) -> BlockResult:
        for lease in state.leases.values():
            self._give(lease)
        state.leases.clear()
        for tier, slot in state.cache_slots.items():
            self.cache_pools[tier].give(slot)  # once the work queued on this stream has used it
        state.cache_slots.clear()
        if state.scratch_dir is not None:
            shutil.rmtree(state.scratch_dir, ignore_errors=True)
        return state.result()

    # --- KV cache --------------------------------------------------------------------------------
    def load_cache(self, state: BlockState, token_idx: int, layer_idx: int, batch_idx: int) -> KVLease:
        """The view a decode step of (layer, batch) attends over, with the past in it. Under sparse
        attention only the keys are loaded: values are read at the chosen positions later."""
        cache = state.caches[(layer_idx, batch_idx)]
        if cache.place.in_place:
            return self._in_place(cache)
        past = state.past_slots(token_idx)
        lease, staging = self._take_scratch(state.block, cache)
        self.order.wait_released(cache.written)  # the last store's copy has landed
        copy(lease.k, past, cache.k, past, staging.get("k"))
        if self.sparsity == 1:
            copy(lease.v, past, cache.v, past, staging.get("v"))
        return lease

    def lease_for_compute(self, state: BlockState, layer_idx: int, batch_idx: int, loaded: KVLease | None) -> KVView:
        """The view a compute writes its keys and values to (the prefill loads nothing)."""
        if loaded is None:
            cache = state.caches[(layer_idx, batch_idx)]
            loaded = self._in_place(cache) if cache.place.in_place else self._take_scratch(state.block, cache)[0]
        state.leases[(layer_idx, batch_idx)] = loaded
        return loaded.view

    def store_cache(self, state: BlockState, token_idx: int, layer_idx: int, batch_idx: int) -> None:
        """The step's new rows to the cache's tier, when the layer wrote them into scratch."""
        lease = state.leases.pop((layer_idx, batch_idx))
        cache = state.caches[(layer_idx, batch_idx)]
        if lease.scratch is None:
            _seal(cache)
            return  # the layer wrote into the cache itself
        try:
            for rows in state.written_slots(token_idx, batch_idx):
                copy(cache.k, rows, lease.k, rows)  # converted or quantized on the way
                copy(cache.v, rows, lease.v, rows)
            _seal(cache)
            cache.written = self.order.mark_released()  # the next load of this cache waits for these copies
        finally:
            self._give(lease)

    @property
    def sparsity(self) -> float:
        return self.placement.policy.attn_sparsity

    def _in_place(self, cache: KVCache) -> KVLease:
        on_host = cache.place.k_tier is Tier.CPU and self.device.type != "cpu"
        attend_on = torch.device("cpu") if on_host else self.device
        if cache.place.compressed or self.cache_dtype != self.dtype:
            return KVLease(StoredKV(cache.k, cache.v, attend_on, self.sparsity))
        return KVLease(DenseKV(cache.k.data, cache.v.data, attend_on, self.sparsity))

    def _take_scratch(self, block: Block, cache: KVCache) -> tuple[KVLease, dict]:
        """A scratch pair in the compute dtype, and staging for compressed parts to come through."""
        p = self.placement
        if self.scratch is None:
            pair = p.buffer("kv scratch")
            self.scratch = SlotPool(pair.count, pair.nbytes_each, self.device)
        slot = self.scratch.take()
        rows = block.prompt_len + block.max_new_tokens
        pieces = {(piece.name, piece.part): piece for piece in p.scratch_layout(p.workload.seq_len)}
        # heads-major, as attention reads it: the copy into scratch lays it out on the way
        k, v = (slot.heads_major_view(pieces[(which, "value")], rows) for which in ("k", "v"))
        staging = {}
        if ("k", "data") in pieces:  # a compressed cache: each part's staging (a QuantizedTensor)
            from ..storage.quantize import QuantizedTensor

            config = p.policy.compression
            for which in ("k", "v"):
                shape = cache_quantized_shape(which, tuple(k.shape), config)  # KIVI's keys: a group of slots a row
                parts = [slot.view(pieces[(which, part)], shape[0]) for part in ("data", "scale", "mins")]
                staging[which] = QuantizedTensor(*parts, shape=shape, dtype=self.dtype, config=config)
        values = cache.v if self.sparsity < 1 else None  # sparse attention reads values on their tier
        return KVLease(DenseKV(k, v, self.device, self.sparsity, values), slot, k, v), staging

    def release(self, lease: KVLease) -> None:
        """Give back a lease that no compute will use (a block dropped before its step)."""
        self._give(lease)

    def _give(self, lease: KVLease) -> None:
        if lease.scratch is not None:
            self.scratch.give(lease.scratch)

    # --- activations -----------------------------------------------------------------------------
    def store_act(self, state: BlockState, batch_idx: int) -> None:
        """A batch's hidden state to its home between two layers; in a step where new prompts took
        some of its rows (refill.py) theirs too, to a home on the same tier: the two together are
        at most the prefill's (the planned size) and one token per row."""
        state.acts[batch_idx].store(state.hidden.pop(batch_idx))
        if batch_idx in state.refill_hidden:
            if batch_idx not in state.refill_acts:
                state.refill_acts[batch_idx] = self._act_home(state, batch_idx, "refill_")
            x = state.refill_hidden.pop(batch_idx)  # (R, L, C); a file holds (L, gpu batch, C)
            home, rows = state.refill_acts[batch_idx], x.shape[0]
            if home.file is not None:
                x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.placement.policy.gpu_batch_size - rows))
            home.store(x)
            state.refill_waiting[batch_idx] = rows

    def load_act(self, state: BlockState, batch_idx: int) -> None:
        state.hidden[batch_idx] = state.acts[batch_idx].load()
        if batch_idx in state.refill_waiting:
            rows = state.refill_waiting.pop(batch_idx)
            state.refill_hidden[batch_idx] = state.refill_acts[batch_idx].load()[:rows]


def _seal(cache: KVCache) -> None:
    """A KIVI cache quantizes a group of slots the step completed, now that attention has read it."""
    if not cache.place.compressed:  # only a compressed cache can be KIVI's
        return
    for tensor in (cache.k, cache.v):
        if layout_of(tensor) == "kivi":
            tensor.seal()


# --- Where loads run: a small thread pool (overlap on) or inline (overlap off).
# 
# With overlap, the next layer's weights and the next batch's KV cache are loaded on pool threads
# while the current batch computes. On a GPU each pool thread copies on its own CUDA stream, so
# host-to-device transfers run beside the compute stream; a load's result is handed over only
# once its stream has finished, so compute never reads a half-copied buffer. Both modes give
# identical tokens.

class Ready:
    """An already available value with a Future's `result()`."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


class Loader:
    def __init__(self, *, workers: int, device: torch.device, overlap: bool):
        self.device = device
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="flexgen-io") if overlap else None
        self._streams = threading.local()

    def submit(self, fn, *args) -> Future | Ready:
        if self._pool is None:
            return Ready(fn(*args))
        if self.device.type == "cuda":
            return self._pool.submit(self._on_load_stream, fn, *args)
        return self._pool.submit(fn, *args)

    def _on_load_stream(self, fn, *args):
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            out = fn(*args)
        stream.synchronize()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
