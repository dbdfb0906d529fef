"""The engine's working buffers of a placement: weight slots, KV scratch pairs, disk read buffers,
send/receive buffers, and estimates of one GPU batch's compute workspace, of dequantization's
scratch and of the chunk attention reads a stored cache in (pure Python).

The sizes of the last two are chosen here and used by the storage and engine code
(`storage/quantize.py`, `engine/kv_views.py`), so what runs is what is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .compression import cache_quantized_shape, cache_window_shape, compressed_row_bytes, compressed_shapes
from .placement import BufferPlace, Placement
from ..spec.model import ModelSpec
from .tiers import ATTENTION_QUERY_CHUNK, READ_ALIGN, Tier, dtype_bytes, slot_bytes


HOST_HEAP_SLACK = 64 << 20  # two of glibc's largest heap-served blocks (its mmap threshold tops out at 32 MiB)

# Values dequantized at a time (storage/quantize.py): 16 MiB of fp32 scratch, whatever the size of
# the tensor. A 70B-class MLP weight (8192 x 28672) would otherwise take a 0.9 GiB fp32 scratch
# per loader stream; 16 MiB is still thousands of GPU threads' worth of work per kernel.
DEQUANTIZE_CHUNK_VALUES = 1 << 22

# Attention over a cache stored otherwise than it is read (16-bit on a CPU that computes in fp32,
# or quantized), and sparse attention's scores, read the keys (and values) in chunks of positions
# (engine/kv_views.py). A chunk is sized in bytes, so it stays bounded at any batch size, and in
# positions: on a GPU up to 4096 (each chunk costs a dozen kernel launches: few, large chunks),
# on the CPU up to 256 (the chunk's fp32 keys and values stay near the caches).
ATTENTION_CHUNK_BYTES = {True: 64 << 20, False: 16 << 20}  # keyed by "on a GPU"
ATTENTION_CHUNK_MAX_POSITIONS = {True: 4096, False: 256}
ATTENTION_CHUNK_MIN_POSITIONS = 16


@dataclass(frozen=True)
class Dims:
    hidden: int
    kv_dim: int
    q_dim: int
    intermediate: int
    num_heads: int
    vocab: int

    @classmethod
    def of(cls, spec: ModelSpec) -> "Dims":
        return cls(spec.hidden_size, spec.kv_dim, spec.num_heads * spec.head_dim, spec.mlp_width,
                   spec.num_heads, spec.vocab_size)


def working_buffers(p: Placement, dims: Dims, compute: int) -> tuple[BufferPlace, ...]:
    b, policy, w = p.buffers, p.policy, p.workload
    device_tier = Tier.GPU
    out = []
    weight_slot = max((slot_bytes(layout) for layout in p.slot_layouts.values()), default=0)
    if weight_slot:
        out.append(BufferPlace("weight slots", device_tier, b.prefetch_depth + 1, weight_slot))
    if any(not c.in_place for c in p.caches.values()):
        out.append(BufferPlace("kv scratch", device_tier, 2, slot_bytes(p.scratch_layout(w.seq_len))))
    host = Tier.CPU if b.separate_gpu else Tier.GPU  # without a GPU, the gpu tier is the host memory it runs in
    if p.has_disk():
        out.append(BufferPlace("read buffers", host, max(1, b.io_threads), _read_buffer_bytes(p, dims)))
    if b.num_ranks > 1:
        # Receives of a task's input (every GPU batch) and the sends not yet completed.
        wire = Tier.GPU  # gloo's host buffers without a GPU, NCCL's device buffers with one
        each = policy.gpu_batch_size * (w.prompt_len + 1) * dims.hidden * compute  # a refill step: rows and prompts
        out.append(BufferPlace("send/recv", wire, 2 * policy.num_gpu_batches, each))
    scratch = _dequantize_scratch(p)
    if scratch:
        # Each loader thread (prefetch_depth + 1, each on its own CUDA stream, whose freed blocks
        # the caching allocator keeps for that stream) may dequantize at once, and the compute
        # thread too when attention reads a compressed cache, the embedding gathers rows of a
        # compressed table or the head streams a compressed projection.
        on_compute = any(c.compressed for c in p.caches.values()) or any(
            w.compressed and (w.gathered or w.chunk_rows) for places in p.weights.values() for w in places)
        dequantizers = b.prefetch_depth + 1 + on_compute
        out.append(BufferPlace("dequantize scratch", device_tier, dequantizers, scratch, estimate=True))
    out.extend(_attention_chunks(p, dims))
    workspace = _workspace_bytes(p, dims, compute)
    out.append(BufferPlace("compute workspace", device_tier, 1, workspace, estimate=True))
    # Freed temporaries the allocator keeps (glibc's heap below its mmap threshold, torch's CUDA
    # caching allocator) and the holes between them: measured at about half a workspace on the
    # bundled model's default run (peak 1.12x the plan without it). Forcing every temporary back
    # to the system instead (a fixed 4 MiB mmap threshold) made elementwise ops 2-4x slower.
    # glibc returns blocks over its threshold (at most 32 MiB) at once, so on the host the slack
    # is bounded; CUDA's caching allocator keeps every size.
    slack = workspace // 2 if b.separate_gpu else min(workspace // 2, HOST_HEAP_SLACK)
    out.append(BufferPlace("allocator slack", device_tier, 1, slack, estimate=True))
    return tuple(out)


def _read_buffer_bytes(p: Placement, dims: Dims) -> int:
    """One read: a chunk of whole rows (at least one row, at most the most rows of a disk tensor
    read at once), plus O_DIRECT's alignment slack. A compressed tensor is three files (data,
    scale, mins)."""
    storage, compute = dtype_bytes(p.dtypes.storage), dtype_bytes(p.dtypes.compute)
    config = p.policy.compression
    tensors = []  # (bytes of a row, bytes of the tensor) of every disk file

    def add(shape: tuple[int, ...], compressed: bool, itemsize: int) -> None:
        if compressed:
            rows = compressed_row_bytes(shape, config)
            tensors.extend((part, part * shape[0]) for part in (rows.data, rows.scale))
        else:
            row = itemsize * math.prod(shape[1:])
            tensors.append((row, row * shape[0]))

    for places in p.weights.values():
        for place in places:
            if place.tier is Tier.DISK:
                # a gathered table is read a run of token rows at a time (often one), a streamed
                # projection a chunk at a time: a buffer need not hold more
                rows = 1 if place.gathered else place.chunk_rows or place.shape[0]
                add((rows, *place.shape[1:]), place.compressed, storage)
    if p.cache_bytes()[Tier.DISK]:
        shape, itemsize = p.cache_shape(p.workload.seq_len), dtype_bytes(p.cache_dtype)
        if p.policy.compress_cache:  # the quantized parts of keys and values, and KIVI's window
            for which in ("k", "v"):
                add(cache_quantized_shape(which, shape, config), True, itemsize)
            window = cache_window_shape(shape, config)
            if window is not None:
                add(window, False, itemsize)
        else:
            add(shape, False, itemsize)
    if p.act_bytes()[Tier.DISK]:
        add((p.workload.prompt_len, p.policy.gpu_batch_size, dims.hidden), False, compute)
    need = max(min(total, max(row, p.buffers.chunk_bytes)) for row, total in tensors)
    return need + 2 * READ_ALIGN


def _workspace_bytes(p: Placement, dims: Dims, compute: int) -> int:
    """Transient memory of one GPU batch's layer compute (an estimate): the peak of the prefill's
    phases, not their sum. Attention: the input and its norm, q, k, v, RoPE's temporaries (q's
    rotated half, its concatenation and the two products while q itself is alive), the output, and
    the scores of one chunk of queries in fp32 (the math backend's worst case). MLP: the attention
    output (alive until the layer returns), the input and its norm, gate, up, the activation and
    the product. Head: fp32 logits and the logits of one chunk of the vocabulary in the compute
    dtype (all of it when the projection is loaded whole: converted to fp32 after). Embedding:
    the gathered rows of the step's tokens (fp32 when dequantized), the hidden state they become,
    and OPT's positions and their sum. Checked against the resident set of one layer's prefill.
    Experts (model/moe.py), with an expert's width as the intermediate size (every row may choose
    one expert): besides, the router's logits, their fp32 copy and softmax, the top-k weights
    (and renormalised) and indices, the grouping's int64 indices, the output being summed, an
    expert's gathered rows, its output and that weighted in fp32 (Mixtral's weights are fp32)."""
    gbs, seq = p.policy.gpu_batch_size, p.workload.seq_len
    # the tokens a step computes: a prefill's prompts, or (refill, engine/refill.py) a decode step's
    # rows beside the prompts that started in some of them, at most one token more per row
    prompt = p.workload.prompt_len + 1
    rope = 2 * dims.q_dim if p.spec.family != "opt" else 0  # OPT's positions are added to the embedding
    attention = gbs * prompt * (2 * dims.hidden + 3 * dims.q_dim + rope + 3 * dims.kv_dim) * compute
    attention += gbs * max(dims.num_heads, 1) * min(prompt, ATTENTION_QUERY_CHUNK) * seq * 4
    mlp = gbs * prompt * (2 * dims.hidden + dims.q_dim + 4 * dims.intermediate) * compute
    spec = p.spec
    if spec.is_moe:
        E, k = spec.num_experts, spec.num_experts_per_tok
        routing = E * (compute + 2 * 4) + k * (2 * 4 + 8) + 4 * k * 8
        mlp += gbs * prompt * (routing + 3 * dims.hidden * compute + dims.hidden * 4)
    chunk = dims.vocab if compute < 4 else 0  # linear(...).float(): both alive at once
    for places in p.weights.values():
        for w in places:
            if w.chunk_rows is not None:
                chunk = w.chunk_rows
    head = gbs * (prompt if p.buffers.scoring else 2) * (dims.vocab * 4 + chunk * compute)  # rows and new prompts
    embed = gbs * prompt * (2 * dims.hidden * 4 + 3 * dims.hidden * compute)
    return max(attention, mlp, head, embed)


def dequantize_scratch_bytes(row_values: int, numel: int, config) -> int:
    """Temporaries of one `dequantize` of a tensor whose rows (leading index) hold `row_values`
    padded values, `numel` in all: a chunk of whole rows of about DEQUANTIZE_CHUNK_VALUES (at
    least one row) as fp32 scratch, its scales and minimums in fp32, and with 4 bits one nibble
    plane (uint8, half the chunk's values) at a time."""
    per_chunk = max(1, DEQUANTIZE_CHUNK_VALUES // max(1, row_values)) * row_values
    values = min(numel, per_chunk)
    stats = -(-values // config.group_size)
    return values * 4 + 2 * stats * 4 + (values // 2 if config.bits == 4 else 0)


def _dequantize_scratch(p: Placement) -> int:
    """The largest dequantization scratch of the rank's compressed weights and caches (0: none)."""
    config = p.policy.compression
    step_rows = p.policy.gpu_batch_size * p.workload.prompt_len  # the most rows a gather dequantizes
    shapes = [(min(w.shape[0], step_rows) if w.gathered else w.chunk_rows or w.shape[0], *w.shape[1:])
              for places in p.weights.values() for w in places if w.compressed]
    if any(c.compressed for c in p.caches.values()):  # keys and values (KIVI's keys: a group of slots a row)
        shapes += [cache_quantized_shape(which, p.cache_shape(p.workload.seq_len), config) for which in ("k", "v")]
    best = 0
    for shape in shapes:
        stats = compressed_shapes(shape, config).stats  # (rows, *other, groups)
        row_values = math.prod(stats[1:]) * config.group_size
        best = max(best, dequantize_scratch_bytes(row_values, shape[0] * row_values, config))
    return best


def attention_position_bytes(batch: int, kv_dim: int, num_heads: int, queries: int = 1) -> int:
    """fp32 bytes one cache position adds to a chunk of attention: its keys and values (B, kv_dim)
    each, and per query its score, its weight and a masked copy (B, heads)."""
    return batch * (2 * kv_dim + 3 * num_heads * queries) * 4


def attention_chunk_positions(*, batch: int, kv_dim: int, num_heads: int, on_gpu: bool, queries: int = 1,
                              align: int = 1) -> int:
    """Positions per chunk of attention over a stored cache (see ATTENTION_CHUNK_BYTES), a
    multiple of `align` (KIVI's groups of key slots: a chunk that cut a group would dequantize
    it twice), rounded up to one (rounded down, 122 positions would make chunks of one group of
    64: twice the chunks, each a fixed cost), at least one."""
    fit = ATTENTION_CHUNK_BYTES[on_gpu] // attention_position_bytes(batch, kv_dim, num_heads, queries)
    positions = max(ATTENTION_CHUNK_MIN_POSITIONS, min(ATTENTION_CHUNK_MAX_POSITIONS[on_gpu], fit))
    return -(-positions // align) * align


def _attention_chunks(p: Placement, dims: Dims) -> list[BufferPlace]:
    """One chunk of decode attention read piece by piece (engine/kv_views.py): over a cache read in
    place but stored otherwise than the compute dtype (StoredKV), and the keys of sparse attention;
    where attention runs: the compute device ("attention chunk"), or host memory with CPU attention
    beside a GPU ("attention chunk on host"). One (layer, batch) computes at a time."""
    b, policy = p.buffers, p.policy
    sparse = policy.attn_sparsity < 1
    stored = policy.compress_cache or p.cache_dtype != p.dtypes.compute
    tiers = set()
    for c in p.caches.values():
        if sparse or (c.in_place and stored):
            on_host = b.separate_gpu and c.in_place and c.k_tier is Tier.CPU  # CPU attention
            tiers.add(Tier.CPU if on_host else Tier.GPU)
    gbs, out = policy.gpu_batch_size, []
    kivi = policy.compress_cache and policy.compression.cache_method == "kivi"
    align = policy.compression.group_size if kivi else 1
    for tier, name in ((Tier.GPU, "attention chunk"), (Tier.CPU, "attention chunk on host")):
        if tier in tiers:
            on_gpu = b.separate_gpu and tier is Tier.GPU
            positions = min(p.workload.seq_len, attention_chunk_positions(
                batch=gbs, kv_dim=dims.kv_dim, num_heads=dims.num_heads, on_gpu=on_gpu, align=align))
            out.append(BufferPlace(name, tier, 1, positions * attention_position_bytes(gbs, dims.kv_dim, dims.num_heads),
                                   estimate=True))
    return out
