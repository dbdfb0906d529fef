"""GPU memory and host syncs the plan used not to see (issue 18, items 4 and 8), checked on the CPU:

- dequantizing a weight uses a bounded scratch whatever the weight's size, and the placement counts it;
- sparse attention scores the keys chunk by chunk, never an fp32 copy of the whole key cache;
- chunked attention over a stored cache takes a chunk sized for the device, counted in the placement;
- a KV store and an attention step make no device-to-host sync (counted with a fake: every tensor
  method that reads a value back to the host is wrapped);
- the planner's gpu capacity keeps a reserve for the CUDA context, cuBLAS and NCCL, and a GPU that
  several local ranks share is divided among them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flexgen_dist.engine import kv_views
from flexgen_dist.engine.kv_views import DenseKV, StoredKV
from flexgen_dist.model.layers import sparse_attention
from flexgen_dist.machine import detect
from flexgen_dist.planning import working
from flexgen_dist.planning.compression import CompressionConfig
from flexgen_dist.machine.hardware import Capacities
from flexgen_dist.parallel.group import Pipeline
from flexgen_dist.spec.layout import model_units
from flexgen_dist.planning.place import plan_placement
from flexgen_dist.planning.placement import Buffers, Dtypes, Tier, Workload
from flexgen_dist.planning.policy import Policy
from flexgen_dist.machine.presets import FLEXGEN_T4
from flexgen_dist.spec.model import ModelSpec
from flexgen_dist.storage import quantize as quantize_module
from flexgen_dist.storage.quantize import compressed_in_memory
from flexgen_dist.storage.quantize import dequantize, empty_quantized, quantize, quantize_into

GiB = 1 << 30
MiB = 1 << 20


class NewStorages(TorchDispatchMode):
    """Records the bytes of every storage an op creates (not a view or an in-place result)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.untyped_storage().nbytes())
        return out


# --- item 4a: dequantize's scratch ----------------------------------------------------------------


def test_dequantizing_a_large_weight_uses_a_bounded_scratch_and_the_same_values(monkeypatch):
    config = CompressionConfig(bits=4, group_size=64)
    torch.manual_seed(0)
    q = quantize(torch.randn(1024, 1024), config)
    want = dequantize(q, dtype=torch.float16)  # not fp32: goes through the scratch chunk
    chunk = 1 << 14  # values: 64 KiB of fp32, 1/64 of the weight
    monkeypatch.setattr(quantize_module, "DEQUANTIZE_CHUNK_VALUES", chunk, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4096)  # a many-core host: no bound from threads
    out = torch.empty(q.shape, dtype=torch.float16)
    with NewStorages() as seen:
        dequantize(q, out=out)
    assert torch.equal(out, want)  # bit for bit
    assert max(seen.sizes) <= chunk * 4, f"a temporary of {max(seen.sizes)} bytes; the chunk is {chunk * 4}"


def _spec(hidden=256, intermediate=1024, layers=2) -> ModelSpec:
    return ModelSpec.from_config(dict(model_type="llama", hidden_size=hidden, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=intermediate, num_hidden_layers=layers,
                                      vocab_size=512))


def _plan(policy, spec=None, separate_gpu=True, prefetch_depth=1, workload=Workload(16, 8)):
    spec = spec or _spec()
    return plan_placement(spec, model_units(spec), policy, dtypes=Dtypes("float16", "float16"), workload=workload,
                          buffers=Buffers(separate_gpu=separate_gpu, prefetch_depth=prefetch_depth))


def test_the_placement_counts_one_bounded_dequantize_scratch_per_loader_and_the_compute_thread():
    compressed = Policy(compress_weight=True, w_gpu_percent=0, w_cpu_percent=100)
    small, large = _plan(compressed), _plan(compressed, _spec(hidden=4096, intermediate=16384))
    scratch = small.buffer("dequantize scratch")
    # 2 loader threads, and the compute thread: it dequantizes the rows the embedding gathers
    assert scratch.tier is Tier.GPU and scratch.estimate and scratch.count == 1 + 1 + 1
    assert _plan(compressed, prefetch_depth=3).buffer("dequantize scratch").count == 3 + 1 + 1
    both = _plan(compressed.replace(compress_cache=True))  # attention dequantizes the cache on that thread too
    assert both.buffer("dequantize scratch").count == 1 + 1 + 1
    big = large.buffer("dequantize scratch").nbytes_each
    assert big < 24 * MiB  # a 4096 x 16384 weight is 256 MiB in fp32: the scratch does not grow with it
    assert big == working.dequantize_scratch_bytes(16384, 4096 * 16384, CompressionConfig())
    assert scratch.nbytes_each < big  # a weight smaller than the chunk needs less
    assert "dequantize scratch" not in [b.name for b in _plan(Policy()).working]  # nothing compressed


# --- item 4b: sparse attention's scores -------------------------------------------------------------


def test_sparse_attention_scores_the_keys_chunk_by_chunk():
    torch.manual_seed(3)
    S, B, nkv, nh, hd = 4096, 2, 2, 4, 64
    k, v = torch.randn(S, B, nkv, hd, dtype=torch.bfloat16), torch.randn(S, B, nkv, hd, dtype=torch.bfloat16)
    q = torch.randn(B, nh, 1, hd)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., :5] = False
    keys = k.permute(1, 2, 0, 3)
    want = sparse_attention(q, lambda qg: qg @ keys.float().transpose(-1, -2), S, mask, 0.3, 0.05,
                            lambda pos: kv_views._gather_values(v, pos, nkv, torch.device("cpu")), v[-1:].permute(1, 2, 0, 3))
    view = DenseKV(k, v, torch.device("cpu"), sparsity=0.05)
    view._v_new = v[-1:].permute(1, 2, 0, 3)
    with NewStorages() as seen:
        got = view.attend(q, mask, 0.3, slice(S - 1, S))
    assert torch.allclose(got, want, atol=1e-6)
    whole_keys_fp32 = S * B * nkv * hd * 4
    assert max(seen.sizes) <= whole_keys_fp32 // 8, f"a temporary of {max(seen.sizes)} bytes: the keys are {whole_keys_fp32}"


# --- item 8 (GPU part): the attention chunk ---------------------------------------------------------


def test_attention_chunk_is_larger_on_a_gpu_bounded_on_the_cpu_and_counted():
    positions = working.attention_chunk_positions
    assert positions(batch=1, kv_dim=1024, num_heads=32, on_gpu=True) == 4096
    assert positions(batch=1, kv_dim=1024, num_heads=32, on_gpu=False) == 256
    big_batch = positions(batch=256, kv_dim=1024, num_heads=32, on_gpu=True)
    assert 16 <= big_batch < 4096  # a byte budget, not a fixed count of positions
    assert big_batch * working.attention_position_bytes(256, 1024, 32) <= working.ATTENTION_CHUNK_BYTES[True]
    stored = _plan(Policy(compress_cache=True))  # a compressed cache on the gpu: read piece by piece
    chunk = stored.buffer("attention chunk")
    spec, gbs = _spec(), stored.policy.gpu_batch_size
    n = min(stored.workload.seq_len, positions(batch=gbs, kv_dim=spec.kv_dim, num_heads=spec.num_heads, on_gpu=True))
    assert chunk.tier is Tier.GPU and chunk.estimate
    assert chunk.nbytes == n * working.attention_position_bytes(gbs, spec.kv_dim, spec.num_heads)
    assert "attention chunk" not in [b.name for b in _plan(Policy()).working]  # read in place by SDPA


def test_stored_kv_passes_the_chunk_for_its_device(monkeypatch):
    seen = {}

    def spy(q, read_kv, length, mask, scale, chunk=256):
        seen["chunk"] = chunk
        return torch.zeros(q.shape[0], q.shape[2], q.shape[1] * q.shape[3])

    monkeypatch.setattr(kv_views, "chunked_attention", spy)
    S, B, nkv, nh, hd = 64, 3, 2, 4, 64
    cache = _compressed_cache(S, B, nkv, hd)
    view = StoredKV(cache[0], cache[1], torch.device("cpu"))
    view.write(slice(S - 1, S), torch.randn(B, nkv, 1, hd), torch.randn(B, nkv, 1, hd))
    view.attend(torch.randn(B, nh, 1, hd), torch.ones(B, 1, 1, S, dtype=torch.bool), 0.1, slice(S - 1, S))
    assert seen["chunk"] == working.attention_chunk_positions(batch=B, kv_dim=nkv * hd, num_heads=nh, on_gpu=False)


# --- item 8: host syncs ----------------------------------------------------------------------------


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every call that reads a tensor's value back to the host (a sync on a GPU)."""
    calls = []
    for name in ("cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    real_unique = torch.unique

    def unique(*args, **kwargs):  # its output size depends on the values: a sync on a GPU
        calls.append("unique")
        return real_unique(*args, **kwargs)

    monkeypatch.setattr(torch, "unique", unique)
    return calls


def _compressed_cache(S, B, nkv, hd, bits=4):
    config = CompressionConfig(bits=bits)
    parts = []
    for _ in range(2):
        q = empty_quantized((S, B, nkv, hd), config)
        quantize_into(q, slice(None), torch.randn(S, B, nkv, hd))
        parts.append(compressed_in_memory((q.data, q.scale, q.mins), (S, B, nkv, hd), config, Tier.GPU))
    return parts


def test_storing_a_kv_row_makes_no_host_sync(host_reads):
    S, B, nkv, hd = 32, 2, 2, 64  # (S, B, nkv, hd): the cache layout
    q = empty_quantized((S, B, nkv, hd), CompressionConfig())
    row = torch.randn(1, B, nkv, hd)
    quantize_into(q, slice(5, 6), row)
    assert host_reads == []


def test_a_nan_is_not_hidden_by_quantization():
    """No check (and no sync) at the store: a NaN comes back as NaN, for the engine's check of the
    layer's output to report."""
    x = torch.randn(2, 128)
    x[1, 70] = float("nan")
    y = dequantize(quantize(x, CompressionConfig()))
    assert torch.isnan(y[1, 64:]).all()  # its group
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[1, :64]).all()  # the others are untouched


@pytest.mark.parametrize("kind", ["dense-sparse", "stored-sparse", "stored-dense", "kivi-sparse", "kivi-dense"])
def test_an_attention_step_makes_no_host_sync(kind, host_reads):
    torch.manual_seed(4)
    S, B, nkv, nh, hd = 40, 2, 2, 4, 64
    q, mask = torch.randn(B, nh, 1, hd), torch.ones(B, 1, 1, S, dtype=torch.bool)
    k_new, v_new = torch.randn(B, nkv, 1, hd), torch.randn(B, nkv, 1, hd)
    if kind == "dense-sparse":
        view = DenseKV(torch.randn(S, B, nkv, hd), torch.randn(S, B, nkv, hd), torch.device("cpu"), sparsity=0.5)
    elif kind.startswith("kivi"):  # groups of 8 slots: this step's write completes [32, 40), sealed after
        from test_kivi_cache import make_kivi

        valid = torch.ones(B, S, dtype=torch.bool)
        k, v = (make_kivi(which, (S, B, nkv, hd), CompressionConfig(group_size=8), "memory", None, valid)
                for which in ("k", "v"))
        for t in (k, v):
            t.write(slice(0, S - 1), torch.randn(S - 1, B, nkv, hd))
        view = StoredKV(k, v, torch.device("cpu"), sparsity=0.5 if kind == "kivi-sparse" else 1.0)
    else:
        k, v = _compressed_cache(S, B, nkv, hd)
        view = StoredKV(k, v, torch.device("cpu"), sparsity=0.5 if kind == "stored-sparse" else 1.0)
    host_reads.clear()
    view.write(slice(S - 1, S), k_new, v_new)
    out = view.attend(q, mask, 0.125, slice(S - 1, S))
    if kind.startswith("kivi"):
        k.seal(), v.seal()
    assert host_reads == [], f"host reads in one attention step: {host_reads}"
    assert out.shape == (B, 1, nh * hd)


def test_gathering_values_of_a_compressed_cache_in_memory_matches_its_dequantized_rows():
    torch.manual_seed(5)
    S, B, nkv, hd = 12, 2, 2, 64
    v = torch.randn(S, B, nkv, hd)
    config = CompressionConfig(bits=8)
    q = quantize(v, config)
    source = compressed_in_memory((q.data, q.scale, q.mins), v.shape, config, Tier.GPU)
    positions = torch.tensor([[[3, 4, 0], [11, 3, 5], [7, 8, 9], [1, 2, 10]]] * B)  # (B, nh, k)
    got = kv_views._gather_values(source, positions, nkv, torch.device("cpu"))
    want = kv_views._gather_values(dequantize(q), positions, nkv, torch.device("cpu"))
    assert torch.equal(got, want)


# --- item 4c and 4d: the gpu capacity a rank plans with ------------------------------------------


class FakePipeline:
    def __init__(self, rank, world_size, local_world_size, backend):
        self.rank, self.world_size = rank, world_size
        self.ctx = dataclasses.make_dataclass("Ctx", ["rank", "world_size", "local_rank", "local_world_size", "backend"])(
            rank, world_size, rank % local_world_size, local_world_size, backend)

    def gather(self, obj, what: str = "plans"):
        return [obj] * self.world_size

    together = Pipeline.together  # every rank's step over this gather


def _rank_gpu_mem(monkeypatch, *, gpus=1, free=80 * GiB, pipeline=None, context_created=False, hardware=None):
    from flexgen_dist import profile
    from flexgen_dist.api import planner

    machine = FLEXGEN_T4.with_capacities(Capacities(has_gpu=True, gpu_mem=free, cpu_mem=200 * GiB, host_mem=200 * GiB,
                                                    disk_mem=1000 * GiB))
    monkeypatch.setattr(profile, "machine_hardware", lambda *a, hardware=None, **k: machine if hardware is None else FLEXGEN_T4)
    monkeypatch.setattr(detect, "cuda_device_count", lambda: gpus, raising=False)
    monkeypatch.setattr(detect, "cuda_context_created", lambda: context_created, raising=False)
    local = pipeline.ctx.local_world_size if pipeline else 1
    hw = planner.rank_hardware(planner.Capacity(hardware=hardware), device="cuda:0", offload_dir=None,
                               compute_dtype="float16", local_world_size=local, pipeline=pipeline)
    return hw.capacities.gpu_mem


def test_the_gpu_capacity_keeps_a_reserve_for_context_cublas_and_nccl(monkeypatch):
    alone = _rank_gpu_mem(monkeypatch)
    assert alone < 80 * GiB, "the whole free GPU memory planned: nothing left for the CUDA context"
    assert alone == 80 * GiB - detect.gpu_reserve(context_created=False, backend=None, world_size=1)
    assert 256 * MiB <= 80 * GiB - alone <= 2 * GiB
    with_context = _rank_gpu_mem(monkeypatch, context_created=True)  # already in what was free
    assert alone < with_context < 80 * GiB
    gloo = _rank_gpu_mem(monkeypatch, gpus=2, pipeline=FakePipeline(0, 2, 2, "gloo"))
    nccl = _rank_gpu_mem(monkeypatch, gpus=2, pipeline=FakePipeline(0, 2, 2, "nccl"))
    assert gloo == alone and nccl < gloo - 256 * MiB  # NCCL's communicators live on the GPU
    three = _rank_gpu_mem(monkeypatch, gpus=3, pipeline=FakePipeline(1, 3, 3, "nccl"))
    assert three < nccl  # a middle rank talks to two peers
    # a hardware file states the capacity to plan with: no reserve taken from it
    assert _rank_gpu_mem(monkeypatch, hardware="flexgen-t4") == FLEXGEN_T4.capacities.gpu_mem


def test_local_ranks_sharing_one_gpu_each_plan_with_their_share(monkeypatch):
    alone = _rank_gpu_mem(monkeypatch)
    for rank in (0, 1):
        shared = _rank_gpu_mem(monkeypatch, gpus=1, pipeline=FakePipeline(rank, 2, 2, "gloo"))
        assert shared <= 40 * GiB, f"rank {rank} of 2 on one GPU plans with {shared / GiB:.1f} GiB of its 80"
        reserve = detect.gpu_reserve(context_created=False, backend="gloo", world_size=2)
        assert shared == 40 * GiB - reserve  # half of the GPU, less this rank's own context
        assert shared < alone / 2
    # four ranks on two GPUs: two on each
    assert _rank_gpu_mem(monkeypatch, gpus=2, pipeline=FakePipeline(3, 4, 4, "gloo")) == shared
    assert detect.ranks_per_gpu(local_rank=1, local_world_size=3, gpu_count=2) == 1  # ranks 0 and 2 share GPU 0
    assert detect.ranks_per_gpu(local_rank=2, local_world_size=3, gpu_count=2) == 2
