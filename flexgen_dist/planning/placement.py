"""Where every tensor of a rank lives, and how many bytes it takes there (pure Python, no torch).

A `Placement` records, for a rank's units, a `Policy`, the dtypes, the workload and the engine's
buffer settings:

- every weight tensor: its tier and bytes (gpu: the compute dtype, ready to use; cpu and disk:
  the storage dtype, converted when loaded); a head tied to the input embedding (one checkpoint
  tensor) uses the table's, on the table's tier (`WeightPlace.shared`);
- every (layer, batch) KV cache of one block: the tier of its keys and of its values, and
  whether decode attention can read it in place or needs a scratch copy on the compute device;
- every GPU batch's activations (hidden states between layers) of one block: its tier;
- the engine's working buffers (planning/working.py): weight staging slots, KV scratch pairs,
  disk read buffers, send/receive buffers between ranks, and estimates of compute memory.

`place.plan_placement` is the one place that makes one (it picks every tier). The weight store,
the engine, the planner (cost model, search, checks) and `--print-policy` read this object, so
what is planned is what is allocated (tests/test_placement.py measures the tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..spec.layout import Unit
from .policy import Policy
from ..spec.model import ModelSpec
from .compression import cache_quantized_shape
from .tiers import (
    ATTENTION_QUERY_CHUNK, DTYPE_BYTES, READ_ALIGN, SLOT_ALIGN, SlotPiece, Tier, cache_parts, choose_tiers,
    compressed_parts, dtype_bytes, pack, slot_bytes,
)

__all__ = [  # the records, and tiers.py's vocabulary that their readers use with them
    "ActPlace", "BufferPlace", "Buffers", "CachePlace", "Dtypes", "Placement", "WeightPlace", "Workload", "staged",
    "ATTENTION_QUERY_CHUNK", "DTYPE_BYTES", "READ_ALIGN", "SLOT_ALIGN", "SlotPiece", "Tier", "cache_parts", "choose_tiers",
    "compressed_parts", "dtype_bytes", "pack", "slot_bytes",
]


@dataclass(frozen=True)
class Dtypes:
    compute: str  # what layers compute in: float32 on a CPU, float16/bfloat16 on a GPU
    storage: str  # host and disk copies of weights (the checkpoint's dtype by default)


@dataclass(frozen=True)
class Workload:
    prompt_len: int  # the widest block's prompt (blocks are left padded to it)
    gen_len: int  # new tokens per sequence

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.gen_len


@dataclass(frozen=True)
class Buffers:
    """The engine's settings that size its working buffers."""

    separate_gpu: bool  # the gpu tier is a device of its own (False: it is host memory)
    prefetch_depth: int = 1  # layers of weights loaded ahead of the computing one
    io_threads: int = 2  # threads reading disk tensors, each with one read buffer
    chunk_bytes: int = 8 << 20  # bytes per disk read
    num_ranks: int = 1  # pipeline stages; a rank keeps that many blocks in flight
    scoring: bool = False  # the head computes fp32 logits of every prompt position (LLM.score, Runtime.scoring)


@dataclass(frozen=True)
class WeightPlace:
    layer_idx: int
    name: str
    shape: tuple[int, ...]
    tier: Tier
    nbytes: int  # on its tier
    compressed: bool = False  # stored as quantized groups (data, scale, mins)
    gathered: bool = False  # an embedding table: a step reads the rows of its tokens, never the table
    chunk_rows: int | None = None  # streamed through the slot this many rows at a time (None: loaded whole)
    shared: bool = False  # the tensor of an earlier weight of the rank (a tied head): held once, by that one
    expert: bool = False  # one expert's: a decode step loads it only when a row chose it (storage/weights.py)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def resident(self) -> bool:
        """On the compute device in the compute dtype: used where it is, never copied."""
        return self.tier is Tier.GPU and not self.compressed


@dataclass(frozen=True)
class CachePlace:
    """Keys and values of one (layer, GPU batch) of one block, each (seq, batch, kv heads, head dim)."""

    layer_idx: int
    batch_idx: int
    k_tier: Tier
    v_tier: Tier
    k_nbytes: int  # of keys as files (compressed: the quantized parts and KIVI's window)
    v_nbytes: int  # of values
    in_place: bool  # decode attention reads it where it lives (else from a scratch pair)
    compressed: bool = False  # quantized (planning/compression.py: min-max, or KIVI's layout)

    def tier(self, which: str) -> Tier:
        """Where keys ("k") or values ("v") live."""
        return self.k_tier if which == "k" else self.v_tier

    def nbytes(self, which: str) -> int:
        return self.k_nbytes if which == "k" else self.v_nbytes


@dataclass(frozen=True)
class ActPlace:
    batch_idx: int
    tier: Tier
    nbytes: int  # the widest hidden state of the batch: the prefill's (batch, prompt, hidden)


@dataclass(frozen=True)
class BufferPlace:
    name: str
    tier: Tier
    count: int
    nbytes_each: int
    estimate: bool = False  # transient compute memory, estimated rather than allocated by us

    @property
    def nbytes(self) -> int:
        return self.count * self.nbytes_each


@dataclass(frozen=True)
class Placement:
    policy: Policy
    dtypes: Dtypes
    workload: Workload
    buffers: Buffers
    weights: dict[int, tuple[WeightPlace, ...]]  # schedule layer -> its tensors, in unit order
    slot_layouts: dict[int, tuple[SlotPiece, ...]]  # schedule layer -> where its loaded tensors go in a slot
    caches: dict[tuple[int, int], CachePlace]  # (layer, batch) -> one block's cache
    acts: tuple[ActPlace, ...]  # per GPU batch of one block
    working: tuple[BufferPlace, ...]
    spec: ModelSpec = field(repr=False, default=None)
    units: tuple[Unit, ...] = field(repr=False, default=())

    @property
    def blocks_in_flight(self) -> int:
        return self.buffers.num_ranks

    @property
    def cache_dtype(self) -> str:
        """The dtype of an uncompressed KV cache."""
        return self.policy.cache_dtype or self.dtypes.compute

    def cache_shape(self, seq_len: int) -> tuple[int, int, int, int]:
        """One (layer, batch) cache tensor: (seq, batch, kv heads, head dim)."""
        return (seq_len, self.policy.gpu_batch_size, self.spec.num_kv_heads, self.spec.head_dim)

    def scratch_layout(self, seq_len: int) -> tuple[SlotPiece, ...]:
        """A KV scratch pair: keys and values in the compute dtype, and staging for compressed
        caches that are not in device memory (read there first, then dequantized)."""
        shape = self.cache_shape(seq_len)
        pieces = [("k", "value", shape, self.dtypes.compute), ("v", "value", shape, self.dtypes.compute)]
        if self.policy.compress_cache and any(staged(c.k_tier, self.buffers) or staged(c.v_tier, self.buffers)
                                              for c in self.caches.values() if not c.in_place):
            config = self.policy.compression  # the quantized parts only: a KIVI window is read as it is
            for which in ("k", "v"):
                pieces += compressed_parts(which, cache_quantized_shape(which, shape, config), config)
        return pack(pieces)[0]

    def buffer(self, name: str) -> BufferPlace:
        for buf in self.working:
            if buf.name == name:
                return buf
        raise KeyError(name)

    def weight_layout(self, tier: Tier) -> tuple[tuple[SlotPiece, ...], int]:
        """The rank's weights on a memory tier, packed into one arena (pieces named
        "{layer_idx}.{name}"; compressed weights as their data, scale and mins parts), and its bytes.
        One arena per tier instead of a tensor each: on a GPU machine the host arena is pinned at
        its exact size, where pinning tensor by tensor rounds each up to a power of two."""
        pieces = []
        for places in self.weights.values():
            for w in places:
                if w.tier is not tier or w.shared:
                    continue
                name = f"{w.layer_idx}.{w.name}"
                if w.compressed:
                    pieces += compressed_parts(name, w.shape, self.policy.compression)
                else:
                    dtype = self.dtypes.compute if tier is Tier.GPU else self.dtypes.storage
                    pieces.append((name, "value", w.shape, dtype))
        return pack(pieces)

    def weight_footprint(self, w: WeightPlace) -> int:
        """Bytes `w` adds to its tier: its share of the arena (pieces aligned) or its file(s)."""
        if w.shared:
            return 0
        if w.tier is Tier.DISK:
            return w.nbytes
        if w.compressed:
            return pack(compressed_parts(w.name, w.shape, self.policy.compression))[1]
        return pack([(w.name, "value", w.shape, self.dtypes.compute if w.tier is Tier.GPU else self.dtypes.storage)])[1]

    def cache_footprint(self, c: CachePlace, which: str) -> int:
        """Bytes `c`'s keys ("k") or values ("v") add to their tier per block: their share of the
        block's slot (pieces aligned), or their file(s)."""
        if c.tier(which) is Tier.DISK:
            return c.nbytes(which)
        return pack(self._cache_pieces("c", which, c.compressed))[1]

    def _cache_pieces(self, name: str, which: str, compressed: bool) -> list[tuple[str, str, tuple[int, ...], str]]:
        shape = self.cache_shape(self.workload.seq_len)
        if compressed:
            return cache_parts(name, which, shape, self.policy.compression, self.cache_dtype)
        return [(name, "value", shape, self.cache_dtype)]

    def weight_bytes(self) -> dict[Tier, int]:
        """Memory tiers: their arenas; disk: the files."""
        out = {tier: self.weight_layout(tier)[1] for tier in (Tier.GPU, Tier.CPU)}
        out[Tier.DISK] = sum(w.nbytes for places in self.weights.values() for w in places if w.tier is Tier.DISK and not w.shared)
        return out

    def cache_layout(self, tier: Tier) -> tuple[tuple[SlotPiece, ...], int]:
        """One block's KV caches on a memory tier, packed into one slot (pieces named "L{layer}b{batch}k"
        or "...v"; a compressed cache has its data, scale and mins parts), and the slot's bytes.
        A block takes a slot of each memory tier when it opens and gives it back when it closes."""
        pieces = []
        for c in self.caches.values():
            for which in ("k", "v"):
                if c.tier(which) is tier:
                    pieces += self._cache_pieces(f"L{c.layer_idx}b{c.batch_idx}{which}", which, c.compressed)
        return pack(pieces)

    def cache_bytes(self) -> dict[Tier, int]:
        """KV cache of every block in flight: a slot per memory tier per block, and files on disk."""
        out = dict.fromkeys(Tier, 0)
        for tier in (Tier.GPU, Tier.CPU):
            out[tier] = self.cache_layout(tier)[1] * self.blocks_in_flight
        for c in self.caches.values():
            out[Tier.DISK] += self.blocks_in_flight * sum(c.nbytes(which) for which in ("k", "v") if c.tier(which) is Tier.DISK)
        return out

    def act_bytes(self) -> dict[Tier, int]:
        """Disk activations have a file per block in flight; in memory only the computing block's exist."""
        out = dict.fromkeys(Tier, 0)
        for a in self.acts:
            out[a.tier] += a.nbytes * (self.blocks_in_flight if a.tier is Tier.DISK else 1)
        return out

    def working_bytes(self, estimates: bool = True) -> dict[Tier, int]:
        out = dict.fromkeys(Tier, 0)
        for buf in self.working:
            if estimates or not buf.estimate:
                out[buf.tier] += buf.nbytes
        return out

    def bytes_per_tier(self, estimates: bool = True) -> dict[Tier, int]:
        """Peak bytes on each tier: weights, caches, activations and working buffers."""
        parts = (self.weight_bytes(), self.cache_bytes(), self.act_bytes(), self.working_bytes(estimates))
        return {tier: sum(part[tier] for part in parts) for tier in Tier}

    def has_disk(self) -> bool:
        return any(
            n > 0 for n in (self.weight_bytes()[Tier.DISK], self.cache_bytes()[Tier.DISK], self.act_bytes()[Tier.DISK])
        )


def staged(tier: Tier, buffers: Buffers) -> bool:
    """Compressed bytes on this tier must first be brought into device memory to be dequantized."""
    return tier is Tier.DISK or (tier is Tier.CPU and buffers.separate_gpu)
