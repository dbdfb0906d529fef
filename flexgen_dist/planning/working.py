"""The engine's working buffers of a placement: weight slots, KV scratch pairs, disk read buffers,
send/receive buffers, and an estimate of one GPU batch's compute workspace (pure Python)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .compression import compressed_row_bytes
from .spec import ModelSpec
from .tiers import ATTENTION_QUERY_CHUNK, READ_ALIGN, Tier, dtype_bytes, slot_bytes

if TYPE_CHECKING:
    from .placement import BufferPlace, Placement


HOST_HEAP_SLACK = 64 << 20  # two of glibc's largest heap-served blocks (its mmap threshold tops out at 32 MiB)


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
        return cls(spec.hidden_size, spec.kv_dim, spec.num_heads * spec.head_dim, spec.intermediate_size,
                   spec.num_heads, spec.vocab_size)


def working_buffers(p: Placement, dims: Dims, compute: int) -> tuple[BufferPlace, ...]:
    from .placement import BufferPlace

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
        each = policy.gpu_batch_size * w.prompt_len * dims.hidden * compute
        out.append(BufferPlace("send/recv", wire, 2 * policy.num_gpu_batches, each))
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
            row = itemsize * math.prod(shape[1:])
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


def _workspace_bytes(p: Placement, dims: Dims, compute: int) -> int:
    """Transient memory of one GPU batch's layer compute (an estimate): the peak of the prefill's
    phases, not their sum. Attention: the input and its norm, q, k, v, RoPE's temporaries (q's
    rotated half, its concatenation and the two products while q itself is alive), the output, and
    the scores of one chunk of queries in fp32 (the math backend's worst case). MLP: the attention
    output (alive until the layer returns), the input and its norm, gate, up, the activation and
    the product. Head: fp32 logits. Checked against the resident set of one layer's prefill."""
    gbs, prompt, seq = p.policy.gpu_batch_size, p.workload.prompt_len, p.workload.seq_len
    rope = 2 * dims.q_dim if p.spec.family == "llama" else 0  # OPT's positions are added to the embedding
    attention = gbs * prompt * (2 * dims.hidden + 3 * dims.q_dim + rope + 3 * dims.kv_dim) * compute
    attention += gbs * max(dims.num_heads, 1) * min(prompt, ATTENTION_QUERY_CHUNK) * seq * 4
    mlp = gbs * prompt * (2 * dims.hidden + dims.q_dim + 4 * dims.intermediate) * compute
    head = gbs * (prompt if p.buffers.scoring else 1) * dims.vocab * 4
    return max(attention, mlp, head)
