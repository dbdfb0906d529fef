"""Where every tensor of a rank lives, and how many bytes it takes there (pure Python, no torch).

`plan_placement` is the one place that picks a tier. For a rank's units, a `Policy`, the dtypes,
the workload and the engine's buffer settings it gives:

- every weight tensor: its tier and bytes (gpu: the compute dtype, ready to use; cpu and disk:
  the storage dtype, converted when loaded). Within a unit, weights are split by cumulative size
  (FlexGen's rule: a tensor goes where the midpoint of its cumulative size falls);
- every (layer, batch) KV cache of one block: the tier of its keys and of its values (the 2 x
  num_gpu_batches tensors of a layer are split by count), and whether decode attention can read
  it in place or needs a scratch copy on the compute device;
- every GPU batch's activations (hidden states between layers) of one block: its tier;
- the engine's working buffers: weight staging slots (the computing layer and the prefetched
  ones, in the compute dtype), KV scratch pairs, disk read buffers, send/receive buffers between
  ranks, and an estimate of one batch's compute workspace.

The weight store, the engine, the planner (cost model, search, checks) and `--print-policy` read this
object, so what is planned is what is allocated (tests/test_placement.py measures the tensors).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .compression import CompressionConfig, compressed_nbytes, compressed_row_bytes, compressed_shapes
from .layout import Unit
from .policy import Policy
from .spec import ModelSpec

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}
READ_ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffer addresses aligned to this
SLOT_ALIGN = 256  # bytes: every piece of a slot starts on a multiple of this
ATTENTION_QUERY_CHUNK = 1024  # queries per prefill attention call (model/layers.py): bounds its scores


class Tier(enum.Enum):
    GPU = "gpu"  # the compute device (host memory on a machine without a GPU)
    CPU = "cpu"  # host memory (pinned where a GPU makes that pay)
    DISK = "disk"  # files in the offload folder

    def __str__(self) -> str:
        return self.value


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPE_BYTES)}") from None


def choose_tiers(sizes: list[int], percents: tuple[float, float, float]) -> list[Tier]:
    """Tier of each tensor, splitting a list of tensors by cumulative size (FlexGen's rule).

    A tensor goes to the tier whose percentage range holds the midpoint of its cumulative size,
    so gpu gets about `percents[0]` % of the bytes, cpu the next `percents[1]` %, disk the rest."""
    total = sum(sizes)
    if total == 0:
        return [Tier.GPU] * len(sizes)
    gpu_end, cpu_end = percents[0], percents[0] + percents[1]
    tiers, acc = [], 0
    for size in sizes:
        mid = (acc + size / 2) / total * 100
        acc += size
        tiers.append(Tier.GPU if mid < gpu_end else Tier.CPU if mid < cpu_end else Tier.DISK)
    return tiers


@dataclass(frozen=True)
class SlotPiece:
    """A tensor view carved out of a flat byte slot."""

    name: str  # the weight's name (or "k" / "v" in a KV scratch pair)
    part: str  # "value" (in the compute dtype, what layers read), or a compressed part: "data", "scale", "mins"
    offset: int  # bytes from the slot's start
    shape: tuple[int, ...]
    dtype: str


def _compressed_parts(name: str, shape: tuple[int, ...], config: CompressionConfig) -> list[tuple[str, str, tuple[int, ...], str]]:
    shapes = compressed_shapes(shape, config)
    return [(name, "data", shapes.data, "uint8"), (name, "scale", shapes.stats, "float16"), (name, "mins", shapes.stats, "float16")]


def pack(pieces: list[tuple[str, str, tuple[int, ...], str]]) -> tuple[tuple[SlotPiece, ...], int]:
    """Lay pieces (name, part, shape, dtype) out one after another, each start aligned; returns the
    pieces with their offsets and the slot's length in bytes."""
    out, end = [], 0
    for name, part, shape, dtype in pieces:
        out.append(SlotPiece(name, part, end, tuple(shape), dtype))
        numel = 1
        for dim in shape:
            numel *= dim
        end += -(-numel * dtype_bytes(dtype) // SLOT_ALIGN) * SLOT_ALIGN
    return tuple(out), end


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
    scoring: bool = False  # the head computes logits of every prompt position (perplexity)


@dataclass(frozen=True)
class WeightPlace:
    layer_idx: int
    name: str
    shape: tuple[int, ...]
    tier: Tier
    nbytes: int  # on its tier
    compressed: bool = False  # stored as quantized groups (data, scale, mins)

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

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
    nbytes: int  # of keys, and again of values
    in_place: bool  # decode attention reads it where it lives (else from a scratch pair)
    compressed: bool = False  # quantized groups along the head dimension


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
        if self.policy.compress_cache and any(_staged(c.k_tier, self.buffers) or _staged(c.v_tier, self.buffers)
                                              for c in self.caches.values() if not c.in_place):
            pieces += _compressed_parts("k", shape, self.policy.compression)
            pieces += _compressed_parts("v", shape, self.policy.compression)
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
                if w.tier is not tier:
                    continue
                name = f"{w.layer_idx}.{w.name}"
                if w.compressed:
                    pieces += _compressed_parts(name, w.shape, self.policy.compression)
                else:
                    dtype = self.dtypes.compute if tier is Tier.GPU else self.dtypes.storage
                    pieces.append((name, "value", w.shape, dtype))
        return pack(pieces)

    def weight_footprint(self, w: WeightPlace) -> int:
        """Bytes `w` adds to its tier: its share of the arena (pieces aligned) or its file(s)."""
        if w.tier is Tier.DISK:
            return w.nbytes
        if w.compressed:
            return pack(_compressed_parts(w.name, w.shape, self.policy.compression))[1]
        return pack([(w.name, "value", w.shape, self.dtypes.compute if w.tier is Tier.GPU else self.dtypes.storage)])[1]

    def cache_footprint(self, c: CachePlace, tier: Tier) -> int:
        """Bytes one of `c`'s tensors (keys or values) on `tier` adds per block: its share of the
        block's slot (pieces aligned), or its file(s)."""
        if tier is Tier.DISK:
            return c.nbytes
        shape = self.cache_shape(self.workload.seq_len)
        if c.compressed:
            return pack(_compressed_parts("c", shape, self.policy.compression))[1]
        return pack([("c", "value", shape, self.cache_dtype)])[1]

    def weight_bytes(self) -> dict[Tier, int]:
        """Memory tiers: their arenas; disk: the files."""
        out = {tier: self.weight_layout(tier)[1] for tier in (Tier.GPU, Tier.CPU)}
        out[Tier.DISK] = sum(w.nbytes for places in self.weights.values() for w in places if w.tier is Tier.DISK)
        return out

    def cache_layout(self, tier: Tier) -> tuple[tuple[SlotPiece, ...], int]:
        """One block's KV caches on a memory tier, packed into one slot (pieces named "L{layer}b{batch}k"
        or "...v"; a compressed cache has its data, scale and mins parts), and the slot's bytes.
        A block takes a slot of each memory tier when it opens and gives it back when it closes."""
        shape = self.cache_shape(self.workload.seq_len)
        pieces = []
        for c in self.caches.values():
            for which, where in (("k", c.k_tier), ("v", c.v_tier)):
                if where is tier:
                    name = f"L{c.layer_idx}b{c.batch_idx}{which}"
                    if c.compressed:
                        pieces += _compressed_parts(name, shape, self.policy.compression)
                    else:
                        pieces.append((name, "value", shape, self.cache_dtype))
        return pack(pieces)

    def cache_bytes(self) -> dict[Tier, int]:
        """KV cache of every block in flight: a slot per memory tier per block, and files on disk."""
        out = dict.fromkeys(Tier, 0)
        for tier in (Tier.GPU, Tier.CPU):
            out[tier] = self.cache_layout(tier)[1] * self.blocks_in_flight
        for c in self.caches.values():
            out[Tier.DISK] += c.nbytes * self.blocks_in_flight * ((c.k_tier is Tier.DISK) + (c.v_tier is Tier.DISK))
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

    def resized(self, workload: Workload, policy: Policy | None = None) -> "Placement":
        """The same placement for another workload (cache, activation and buffer sizes change),
        and optionally another policy (a smaller block for fewer prompts)."""
        return plan_placement(self.spec, self.units, policy or self.policy, dtypes=self.dtypes, workload=workload,
                              buffers=self.buffers)


def plan_placement(spec: ModelSpec, units, policy: Policy, *, dtypes: Dtypes, workload: Workload, buffers: Buffers) -> Placement:
    """The placement of a rank holding `units` of the model `spec` (see the module docstring)."""
    units = tuple(units)
    compute, storage = dtype_bytes(dtypes.compute), dtype_bytes(dtypes.storage)
    config = policy.compression
    weights: dict[int, tuple[WeightPlace, ...]] = {}
    layouts: dict[int, tuple[SlotPiece, ...]] = {}
    for unit in units:
        tiers = choose_tiers([ws.numel for ws in unit.weights], policy.percents("w"))
        places = []
        for ws, tier in zip(unit.weights, tiers):
            compressed = policy.compress_weight and len(ws.shape) >= 2  # biases and norms stay as they are
            if compressed:
                nbytes = compressed_nbytes(ws.shape, config)
            else:
                nbytes = ws.numel * (compute if tier is Tier.GPU else storage)
            places.append(WeightPlace(unit.layer_idx, ws.name, ws.shape, tier, nbytes, compressed))
        weights[unit.layer_idx] = tuple(places)
        layouts[unit.layer_idx] = _weight_slot_layout(places, dtypes, config, buffers)
    spec_dims = _Dims.of(spec)
    gbs, num_batches = policy.gpu_batch_size, policy.num_gpu_batches
    cache_shape = (workload.seq_len, gbs, spec.num_kv_heads, spec.head_dim)
    if policy.compress_cache:
        cache_each = compressed_nbytes(cache_shape, config)
    else:
        cache_each = workload.seq_len * gbs * spec_dims.kv_dim * dtype_bytes(policy.cache_dtype or dtypes.compute)
    cache_tiers = choose_tiers([1] * (2 * num_batches), policy.percents("cache"))
    caches = {}
    for unit in units:
        if not unit.has_cache:
            continue
        for batch_idx in range(num_batches):
            k_tier, v_tier = cache_tiers[2 * batch_idx], cache_tiers[2 * batch_idx + 1]
            caches[(unit.layer_idx, batch_idx)] = CachePlace(
                unit.layer_idx, batch_idx, k_tier, v_tier, cache_each,
                in_place=_attends_in_place(k_tier, v_tier, policy, buffers), compressed=policy.compress_cache,
            )
    act_each = gbs * workload.prompt_len * spec_dims.hidden * compute
    acts = tuple(
        ActPlace(batch_idx, tier, act_each)
        for batch_idx, tier in enumerate(choose_tiers([1] * num_batches, policy.percents("act")))
    )
    placement = Placement(policy, dtypes, workload, buffers, weights, layouts, caches, acts, (), spec, units)
    working = _working_buffers(placement, spec_dims, compute)
    return Placement(policy, dtypes, workload, buffers, weights, layouts, caches, acts, working, spec, units)


def _staged(tier: Tier, buffers: Buffers) -> bool:
    """Compressed bytes on this tier must first be brought into device memory to be dequantized."""
    return tier is Tier.DISK or (tier is Tier.CPU and buffers.separate_gpu)


def _weight_slot_layout(places, dtypes: Dtypes, config: CompressionConfig, buffers: Buffers) -> tuple[SlotPiece, ...]:
    """Where a layer's loaded weights go in a slot: every non-resident weight in the compute
    dtype, preceded by staging for the compressed bytes of those not already in device memory."""
    pieces = []
    for w in places:
        if w.compressed and _staged(w.tier, buffers):
            pieces += _compressed_parts(w.name, w.shape, config)
    for w in places:
        if not w.resident:
            pieces.append((w.name, "value", w.shape, dtypes.compute))
    return pack(pieces)[0]


def _slot_bytes(layout: tuple[SlotPiece, ...]) -> int:
    if not layout:
        return 0
    last = layout[-1]
    return pack([(last.name, last.part, last.shape, last.dtype)])[1] + last.offset


def _attends_in_place(k_tier: Tier, v_tier: Tier, policy: Policy, buffers: Buffers) -> bool:
    """Decode attention reads the cache where it lives: device memory (both tiers on a machine
    without a GPU), or host memory with CPU attention. A 16-bit or compressed cache is converted
    piece by piece as attention reads it, never copied whole."""
    on_device = {Tier.GPU} if buffers.separate_gpu else {Tier.GPU, Tier.CPU}
    if k_tier in on_device and v_tier in on_device:
        return True
    return policy.cpu_cache_compute and k_tier is Tier.CPU and v_tier is Tier.CPU


@dataclass(frozen=True)
class _Dims:
    hidden: int
    kv_dim: int
    q_dim: int
    intermediate: int
    num_heads: int
    vocab: int

    @classmethod
    def of(cls, spec: ModelSpec) -> "_Dims":
        return cls(spec.hidden_size, spec.kv_dim, spec.num_heads * spec.head_dim, spec.intermediate_size,
                   spec.num_heads, spec.vocab_size)


def _working_buffers(p: Placement, dims: _Dims, compute: int) -> tuple[BufferPlace, ...]:
    b, policy, w = p.buffers, p.policy, p.workload
    device_tier = Tier.GPU
    out = []
    slot_bytes = max((_slot_bytes(layout) for layout in p.slot_layouts.values()), default=0)
    if slot_bytes:
        out.append(BufferPlace("weight slots", device_tier, b.prefetch_depth + 1, slot_bytes))
    if any(not c.in_place for c in p.caches.values()):
        out.append(BufferPlace("kv scratch", device_tier, 2, _slot_bytes(p.scratch_layout(w.seq_len))))
    host = Tier.CPU if b.separate_gpu else Tier.GPU  # without a GPU, the gpu tier is the host memory it runs in
    if p.has_disk():
        out.append(BufferPlace("read buffers", host, max(1, b.io_threads), _read_buffer_bytes(p, dims)))
    if b.num_ranks > 1:
        # Receives of a task's input (every GPU batch) and the sends not yet completed.
        wire = Tier.GPU  # gloo's host buffers without a GPU, NCCL's device buffers with one
        each = policy.gpu_batch_size * w.prompt_len * dims.hidden * compute
        out.append(BufferPlace("send/recv", wire, 2 * policy.num_gpu_batches, each))
    out.append(BufferPlace("compute workspace", device_tier, 1, _workspace_bytes(p, dims, compute), estimate=True))
    return tuple(out)


def _read_buffer_bytes(p: Placement, dims: _Dims) -> int:
    """One read: a chunk of whole rows (at least one row, at most the largest disk tensor), plus
    O_DIRECT's alignment slack. A compressed tensor is three files (data, scale, mins)."""
    storage, compute = dtype_bytes(p.dtypes.storage), dtype_bytes(p.dtypes.compute)
    config = p.policy.compression
    tensors = []  # (bytes of a row, bytes of the tensor) of every disk file

    def add(shape: tuple[int, ...], compressed: bool, itemsize: int) -> None:
        if compressed:
            rows = compressed_row_bytes(shape, config)
            tensors.extend((part, part * shape[0]) for part in (rows.data, rows.scale))
        else:
            row = itemsize
            for dim in shape[1:]:
                row *= dim
            tensors.append((row, row * shape[0]))

    for places in p.weights.values():
        for place in places:
            if place.tier is Tier.DISK:
                add(place.shape, place.compressed, storage)
    if p.cache_bytes()[Tier.DISK]:
        add(p.cache_shape(p.workload.seq_len), p.policy.compress_cache, dtype_bytes(p.cache_dtype))
    if p.act_bytes()[Tier.DISK]:
        add((p.workload.prompt_len, p.policy.gpu_batch_size, dims.hidden), False, compute)
    need = max(min(total, max(row, p.buffers.chunk_bytes)) for row, total in tensors)
    return need + 2 * READ_ALIGN


def _workspace_bytes(p: Placement, dims: _Dims, compute: int) -> int:
    """Transient memory of one GPU batch's layer compute (an estimate): the peak of the prefill's
    phases, not their sum. Attention: the input and its norm, q, k, v and their rotated copies, the
    output, and the scores of one chunk of queries in fp32 (the math backend's worst case). MLP:
    the input and its norm, gate, up, the activation and the product. Head: fp32 logits."""
    gbs, prompt, seq = p.policy.gpu_batch_size, p.workload.prompt_len, p.workload.seq_len
    attention = gbs * prompt * (2 * dims.hidden + 3 * dims.q_dim + 3 * dims.kv_dim) * compute
    attention += gbs * max(dims.num_heads, 1) * min(prompt, ATTENTION_QUERY_CHUNK) * seq * 4
    mlp = gbs * prompt * (2 * dims.hidden + 4 * dims.intermediate) * compute
    head = gbs * (prompt if p.buffers.scoring else 1) * dims.vocab * 4
    return max(attention, mlp, head)
