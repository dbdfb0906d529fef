"""The terms of the cost model: seconds of each kind of work of one layer in one task (no torch).

A task is one token step of one block on a rank's layers (schedule/block.py). In a task a
layer's non-resident weights are loaded once, then each GPU batch loads its KV cache (decode
only, when attention cannot read it in place), computes, stores its new KV rows and hands its
hidden state to the next layer. Each function below prices one kind of that work from the
placement's tiers and exact bytes and the hardware's speeds; cost_model.py adds them up.

Which path a term is on decides how it overlaps (see `Work.seconds`):
- the compute path, the engine's main thread (and on a GPU its compute stream): matmuls,
  attention, CPU attention with its transfers, (de)quantization and dtype conversion, KV-cache
  stores and activation stores and loads (the engine does those in order, between computes);
- the load path, the loader threads (on a GPU each with its own CUDA stream): the next layer's
  weights and the next batch's KV cache, read from disk, then copied to the device: the read and
  the copy of a chunk add up, and weights and cache share link and disk (FlexGen: ctog + dtoc).
Without a GPU the "copy to the device" is a host memory copy (converting 16-bit storage to the
fp32 compute dtype on the way) done by the CPU cores the compute needs too: the model adds it to
the compute path (the pessimistic end); only disk reads overlap there.

Compute: a GEMM as a fixed pass over its weights plus each row at the peak rate (`matmul_seconds`);
attention at its profiled rates, on the device or on the CPU; elementwise ops as passes over
memory (most of a small model's time: the bundled model's prefill, 70 %).

Left out: device-to-device copies, receives from the previous rank, issuing kernels and copies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..machine.hardware import DECODE_MATMUL_ROWS, Speeds
from ..spec.layout import Unit, UnitKind, is_lookup
from .placement import CachePlace, Placement, Tier, WeightPlace, dtype_bytes

TOKEN_ID_BYTES = 8  # int64 token ids the last rank sends to the first


@dataclass(frozen=True)
class Work:
    """Seconds of each kind of work (one layer of one task, or a sum of them)."""

    matmul: float = 0.0  # linear layers on the compute device
    elementwise: float = 0.0  # norms, activations, RoPE, residual adds: memory-bound passes on the compute device
    attention: float = 0.0  # attention on the compute device
    cpu_attention: float = 0.0  # decode attention on the CPU over a host cache, with its q and output transfers
    codec: float = 0.0  # quantize, dequantize and dtype conversion on the compute device
    weight_link: float = 0.0  # weights host -> device (without a GPU: the host copy into the slot)
    weight_disk: float = 0.0  # weights read from disk
    cache_link: float = 0.0  # KV cache host -> device (without a GPU: the host copy into the scratch pair)
    cache_disk: float = 0.0  # KV cache read from disk
    cache_store: float = 0.0  # new KV rows to the cache's tier
    act_io: float = 0.0  # hidden states to their tier after a layer and back before the next
    streamed: float = 0.0  # chunks of a head streamed through its slot while computing: read, copied, decoded
    on_demand: float = 0.0  # experts a decode step's rows chose, loaded once the router chose them: read, copied, decoded

    def values(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in _WORK_FIELDS)

    def __add__(self, other: "Work") -> "Work":
        return Work(*(a + b for a, b in zip(self.values(), other.values())))

    def scaled(self, factor: float) -> "Work":
        return Work(*(a * factor for a in self.values()))

    def compute_path(self, separate_gpu: bool) -> float:
        """Seconds on the compute path; without a GPU the host copies are on it too."""
        serial = (self.matmul + self.elementwise + self.attention + self.cpu_attention + self.codec + self.cache_store
                  + self.act_io + self.streamed + self.on_demand)
        return serial if separate_gpu else serial + self.weight_link + self.cache_link

    def load_path(self, separate_gpu: bool) -> float:
        """Seconds on the loader threads (the next layer's weights, the next batch's cache)."""
        disk = self.weight_disk + self.cache_disk
        return disk + self.weight_link + self.cache_link if separate_gpu else disk

    def seconds(self, *, overlap: bool, separate_gpu: bool) -> float:
        """FlexGen's per-layer model: loads hide behind compute (max) with overlap, else they add."""
        compute, load = self.compute_path(separate_gpu), self.load_path(separate_gpu)
        return max(compute, load) if overlap else compute + load


_WORK_FIELDS = tuple(f.name for f in dataclasses.fields(Work))


# --- moving bytes --------------------------------------------------------------------------------


def host_copy_seconds(speeds: Speeds, src_bytes: float, dst_bytes: float) -> float:
    """A host memory copy that reads src_bytes and writes dst_bytes: a dtype conversion when they
    differ, at the profiled conversion rate (into a reused buffer, as the engine does it) where
    there is one. Without a GPU h2d_bw is a memcpy's rate, which reads and writes the same count."""
    if dst_bytes > src_bytes and speeds.convert_bw > 0:
        return dst_bytes / speeds.convert_bw
    return (src_bytes + dst_bytes) / 2 / speeds.h2d_bw


def disk_read_seconds(p: Placement, speeds: Speeds, nbytes: float) -> float:
    """Reading nbytes of one tensor from disk: its bytes at the sequential rate, plus the cost of
    each read call (one per chunk of the engine's reader), which dominates small pieces such as
    one GPU batch's KV cache of one layer."""
    if nbytes <= 0:
        return 0.0
    reads = -(-nbytes // p.buffers.chunk_bytes)
    return nbytes / speeds.disk_read_bw + reads * speeds.disk_read_latency


def load_seconds(p: Placement, speeds: Speeds, tier: Tier, src_bytes: float, dst_bytes: float) -> tuple[float, float]:
    """(link, disk) seconds to bring bytes stored on `tier` (src_bytes there) onto the compute
    device (dst_bytes there, in the compute dtype)."""
    separate = p.buffers.separate_gpu
    disk = disk_read_seconds(p, speeds, src_bytes) if tier is Tier.DISK else 0.0
    if separate:
        link = 0.0 if tier is Tier.GPU else src_bytes / speeds.h2d_bw  # converted on the device: free
    else:
        link = host_copy_seconds(speeds, src_bytes, dst_bytes)  # read buffer or host tier -> slot
    return link, disk


def store_seconds(p: Placement, speeds: Speeds, tier: Tier, nbytes: float, in_place: bool) -> float:
    """Seconds to write nbytes computed on the device to a tensor on `tier` (a cache read in place
    is written by the layer itself: free in device memory, a device-to-host copy in host memory)."""
    separate = p.buffers.separate_gpu
    if tier is Tier.DISK:
        return (nbytes / speeds.d2h_bw if separate else 0.0) + nbytes / speeds.disk_write_bw
    if tier is Tier.CPU and separate:
        return nbytes / speeds.d2h_bw
    if in_place or separate:
        return 0.0
    return host_copy_seconds(speeds, nbytes, nbytes)  # scratch -> host-memory cache


def convert_seconds(p: Placement, speeds: Speeds, numel: float) -> float:
    """A 16-bit cache read by attention in the compute dtype: a conversion pass (host copy rate
    without a GPU, the dequantization rate, a memory-bound pass too, on one)."""
    compute, stored = dtype_bytes(p.dtypes.compute), dtype_bytes(p.cache_dtype)
    if compute == stored:
        return 0.0
    if p.buffers.separate_gpu:
        return numel * compute / speeds.dequantize_bw
    return host_copy_seconds(speeds, numel * stored, numel * compute)


# --- the terms -----------------------------------------------------------------------------------


def weight_work(p: Placement, speeds: Speeds, layer_idx: int, token_idx: float = 0.0) -> Work:
    """Loading one layer's non-resident weights, once per task."""
    work = Work()
    for w in p.weights[layer_idx]:
        work = work + weight_place_work(p, speeds, w, token_idx)
    return work


def weight_place_work(p: Placement, speeds: Speeds, w: WeightPlace, token_idx: float = 0.0) -> Work:
    """Loading one weight tensor. Compressed weights move their compressed bytes (staged in
    device memory) and are dequantized on the device, whatever their tier. A head larger than a
    slot streams through it: the loader brings its first chunk, then each GPU batch reads the
    other chunks while it computes (the batches zig-zag, so each starts with the chunk the one
    before left), on the compute path. With `experts_on_demand` an expert in a decode step is
    loaded on the compute path once the router chose it for some row of the block
    (`chosen_share` of the experts), not ahead with its layer; in the prefill every expert loads
    with its layer."""
    if w.resident or w.gathered:  # an embedding table is never loaded: a step reads its rows
        return Work()
    if w.expert and token_idx > 0 and p.policy.experts_on_demand:
        whole = weight_place_work(p, speeds, dataclasses.replace(w, expert=False))
        share = chosen_share(p.spec.num_experts, p.spec.num_experts_per_tok, p.policy.block_size)
        return Work(on_demand=share * (whole.codec + whole.weight_link + whole.weight_disk))
    if w.chunk_rows is not None and w.chunk_rows < w.shape[0]:
        chunks = -(-w.shape[0] // w.chunk_rows)
        first = weight_place_work(p, speeds, dataclasses.replace(
            w, shape=(w.chunk_rows, *w.shape[1:]), nbytes=-(-w.nbytes // chunks), chunk_rows=None))
        again = (chunks - 1) * p.policy.num_gpu_batches
        return dataclasses.replace(first, streamed=again * (first.weight_disk + first.weight_link + first.codec))
    dst = w.numel * dtype_bytes(p.dtypes.compute)
    codec = 0.0
    if w.compressed:
        codec = dst / speeds.dequantize_bw
        staged = w.tier is Tier.DISK or (w.tier is Tier.CPU and p.buffers.separate_gpu)
        if not staged:
            return Work(codec=codec)  # dequantized from where it lives
        dst = w.nbytes  # the compressed bytes go to the staging part of the slot
    link, disk = load_seconds(p, speeds, w.tier, w.nbytes, dst)
    return Work(codec=codec, weight_link=link, weight_disk=disk)


def matmul_work(p: Placement, speeds: Speeds, unit: Unit, token_idx: float) -> Work:
    """The unit's linear layers for every GPU batch (`matmul_seconds`: reading the weights once
    per batch, then each row; why small GPU batches do not pay). The head computes the last
    position only (every position when scoring a prompt)."""
    matrices = [ws for ws in unit.weights if len(ws.shape) >= 2 and not is_lookup(unit.kind, ws.name)]
    prefill = token_idx == 0
    width = p.workload.prompt_len if prefill and (unit.kind is not UnitKind.HEAD or p.buffers.scoring) else 1
    rows = p.policy.gpu_batch_size * width
    one_batch = matmul_seconds(speeds, rows, sum(ws.numel for ws in matrices if ws.expert is None))
    experts = sum(ws.numel for ws in matrices if ws.expert is not None)
    if experts:
        one_batch += expert_matmul_seconds(speeds, rows, experts, p.spec.num_experts, p.spec.num_experts_per_tok)
    passes = rows * _elementwise_per_row(p, unit) * dtype_bytes(p.dtypes.compute) / speeds.elementwise_bw
    return Work(matmul=p.policy.num_gpu_batches * one_batch, elementwise=p.policy.num_gpu_batches * passes)


def matmul_seconds(speeds: Speeds, rows: int, numel: float) -> float:
    """A GEMM of `rows` rows over `numel` weights: a fixed time (the weights streamed once) plus
    each row at the peak rate, fitted to the profile's two rates (decode_matmul_flops at
    DECODE_MATMUL_ROWS rows, matmul_flops at many): on the 2-core development CPU (bf16) a 64-row
    GEMM runs 1.3x the rate of a 32-row one, a 256-row one 1.7x."""
    fixed, per_row = _matmul_rates(speeds)
    return numel * (fixed + rows * per_row)


def _matmul_rates(speeds: Speeds) -> tuple[float, float]:
    """Seconds per weight of a GEMM: once (streaming it), and per row."""
    peak = max(speeds.matmul_flops, speeds.decode_matmul_flops)
    fixed = max(0.0, 2 * DECODE_MATMUL_ROWS / speeds.decode_matmul_flops - 2 * DECODE_MATMUL_ROWS / peak)
    return fixed, 2 / peak


def chosen_share(num_experts: int, top_k: int, tokens: float) -> float:
    """The expected share of a layer's experts that some of `tokens` tokens is routed to, each
    choosing top_k of num_experts independently and uniformly: 1 - (1 - k / E) ** tokens. (A
    trained router is not uniform: the bench measures the share on the run.)"""
    return 1 - (1 - top_k / num_experts) ** tokens if num_experts else 1.0


def expert_matmul_seconds(speeds: Speeds, rows: int, numel: float, num_experts: int, top_k: int) -> float:
    """The experts of a sparse layer (`numel` weights in all) on `rows` tokens, each routed to
    top_k of num_experts (model/moe.py): each expert's GEMM streams its weights once when some
    token chose it (`chosen_share`) and takes the rows routed to it, rows * top_k in all."""
    fixed, per_row = _matmul_rates(speeds)
    per_expert = numel / num_experts
    chosen = num_experts * chosen_share(num_experts, top_k, rows)
    return per_expert * (chosen * fixed + rows * top_k * per_row)


def _elementwise_per_row(p: Placement, unit: Unit) -> int:
    """Values read or written by a unit's elementwise ops per row (token), counted from the layer
    math (model/llama.py, model/opt.py): per decoder layer two norms (7 passes over the hidden
    size each), RoPE on q and k (10 passes each), the attention output's transposes (2 over q),
    two residual adds (3 each), the activation and gating (5 over the intermediate size) and the
    cache's new rows (2 over k and v each). A sparse layer (model/moe.py) gates each of a token's
    top_k experts (5 over its width), gathers the token's row for it and adds its weighted output
    back (4 over the hidden size), and routes (a softmax over the experts' logits: 5 over them)."""
    spec = p.spec
    hidden, q_dim, kv_dim = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    if unit.kind is UnitKind.BLOCK and unit.layer_idx - 1 in spec.sparse_layers:
        k = spec.num_experts_per_tok
        mlp = k * (5 * spec.moe_intermediate_size + 4 * hidden) + 5 * spec.num_experts
        return 20 * hidden + 12 * q_dim + 14 * kv_dim + mlp
    if unit.kind is UnitKind.BLOCK:
        return 20 * hidden + 12 * q_dim + 14 * kv_dim + 5 * spec.intermediate_size
    if unit.kind is UnitKind.HEAD:  # the final norm, logits to fp32 and the argmax over them
        return 7 * hidden + 3 * spec.vocab_size
    return 2 * hidden  # the embedding's gather writes a row, positions add one


def _cpu_attention(p: Placement, c: CachePlace) -> bool:
    return p.buffers.separate_gpu and c.in_place and c.k_tier is Tier.CPU


def attention_work(p: Placement, speeds: Speeds, c: CachePlace, token_idx: float) -> Work:
    """Attention of one GPU batch: 4 flop per query per key per hidden dim (q.k and p.v); with
    attn_sparsity f the p.v half runs over a fraction f of the keys."""
    spec, b, s = p.spec, p.policy.gpu_batch_size, p.workload.prompt_len
    q_dim = spec.num_heads * spec.head_dim
    if token_idx == 0:
        return Work(attention=4 * b * s * s * q_dim / speeds.attention_flops)
    keys = s + token_idx
    flops = 2 * b * keys * q_dim * (1 + p.policy.attn_sparsity)
    if not _cpu_attention(p, c):
        return Work(attention=flops / speeds.decode_attention_flops)
    compute = dtype_bytes(p.dtypes.compute)
    # q goes to the host and the output comes back; the new k, v rows are the cache store.
    transfer = b * q_dim * compute / speeds.d2h_bw + b * q_dim * compute / speeds.h2d_bw
    return Work(cpu_attention=flops / speeds.cpu_attention_flops + transfer)


def cache_io_work(p: Placement, speeds: Speeds, c: CachePlace, token_idx: float) -> Work:
    """One GPU batch's KV cache: loading the past into a scratch pair (unless read in place),
    decoding it (dequantize or convert), and storing the step's new rows to the cache's tier."""
    spec, b, s = p.spec, p.policy.gpu_batch_size, p.workload.prompt_len
    row_stored = {which: c.nbytes(which) / p.workload.seq_len for which in "kv"}  # KIVI's window spread over them
    row_numel = b * spec.kv_dim
    row_compute = row_numel * dtype_bytes(p.dtypes.compute)
    sparsity = p.policy.attn_sparsity
    new_rows = s if token_idx == 0 else 1
    codec = 2 * new_rows * row_compute / speeds.quantize_bw if c.compressed else 0.0
    kivi = c.compressed and p.policy.compression.cache_method == "kivi"  # a new row to the window first
    window_row = row_numel * dtype_bytes(p.cache_dtype) if kivi else 0
    store = sum(store_seconds(p, speeds, c.tier(w), new_rows * (row_stored[w] + window_row), c.in_place) for w in "kv")
    link = disk = 0.0
    if token_idx > 0:
        past, keys = s + token_idx - 1, s + token_idx
        # rows attention reads, of k and of v (sparse attention reads a fraction of the values)
        for which, frac in (("k", 1.0), ("v", sparsity)):
            if not c.in_place:
                moved = load_seconds(p, speeds, c.tier(which), frac * past * row_stored[which], frac * past * row_compute)
                link, disk = link + moved[0], disk + moved[1]
            read = frac * keys * row_numel
            if c.compressed:
                codec += read * dtype_bytes(p.dtypes.compute) / speeds.dequantize_bw
            else:
                codec += convert_seconds(p, speeds, read)
    return Work(codec=codec, cache_link=link, cache_disk=disk, cache_store=store)


def cache_work(p: Placement, speeds: Speeds, layer_idx: int, token_idx: float) -> Work:
    """A decoder layer's attention and KV-cache traffic, every GPU batch."""
    alike: dict[tuple, tuple[CachePlace, int]] = {}  # batches whose caches sit alike cost the same
    for batch_idx in range(p.policy.num_gpu_batches):
        c = p.caches[(layer_idx, batch_idx)]
        key = (c.k_tier, c.v_tier, c.in_place, c.k_nbytes, c.v_nbytes, c.compressed)
        alike[key] = (c, alike[key][1] + 1 if key in alike else 1)
    work = Work()
    for c, count in alike.values():
        work = work + (attention_work(p, speeds, c, token_idx) + cache_io_work(p, speeds, c, token_idx)).scaled(count)
    return work


def act_work(p: Placement, speeds: Speeds, token_idx: float) -> Work:
    """One layer's hidden states (every GPU batch) to their tier and back for the next layer."""
    width = p.workload.prompt_len if token_idx == 0 else 1
    nbytes = p.policy.gpu_batch_size * width * p.spec.hidden_size * dtype_bytes(p.dtypes.compute)
    separate = p.buffers.separate_gpu
    seconds = 0.0
    for act in p.acts:
        if act.tier is Tier.CPU and separate:
            seconds += nbytes / speeds.d2h_bw + nbytes / speeds.h2d_bw
        elif act.tier is Tier.DISK:
            write = (nbytes / speeds.d2h_bw if separate else 0.0) + nbytes / speeds.disk_write_bw
            read = disk_read_seconds(p, speeds, nbytes) + (nbytes / speeds.h2d_bw if separate else host_copy_seconds(speeds, nbytes, nbytes))
            seconds += write + read
    return Work(act_io=seconds)


def send_seconds(p: Placement, token_idx: float, link_bw: float, last_stage: bool) -> float:
    """One task's messages to the next rank: every GPU batch's hidden state, or from the last
    rank the sampled token ids (to the first)."""
    if p.buffers.num_ranks == 1:
        return 0.0
    b, num_batches = p.policy.gpu_batch_size, p.policy.num_gpu_batches
    if last_stage:
        return num_batches * b * TOKEN_ID_BYTES / link_bw
    width = p.workload.prompt_len if token_idx == 0 else 1
    return num_batches * b * width * p.spec.hidden_size * dtype_bytes(p.dtypes.compute) / link_bw
