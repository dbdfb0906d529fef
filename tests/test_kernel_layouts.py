"""A kernel's result may come back in another memory layout than the CPU's (CUDA's memory-efficient
attention returns (B, h, T, hd) with the T and h strides swapped); the engine must not assume one.

On the CPU the kernels are wrapped to return the same values in such a layout, and the greedy
tokens must not change: a `.view` on a kernel's result dies here with "view size is not
compatible" as it would on the first GPU run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexgen_dist import LLM, Policy, Runtime
from conftest import hf_greedy, unambiguous_prompts

_ALL_ON_DEVICE = dict(w_gpu_percent=100, w_cpu_percent=0, cache_gpu_percent=100,
                      cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0)
LENGTHS = (5, 9, 3, 12)
NEW_TOKENS = 6


def _swap_strides(out: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
    """The same values with the strides of `dims` exchanged (a non-contiguous, valid layout)."""
    a, b = dims
    return out.transpose(a, b).contiguous().transpose(a, b)


@pytest.fixture
def odd_kernel_layouts(monkeypatch):
    """SDPA returns (B, h, T, hd) laid out as (B, T, h, hd), as CUDA's efficient kernel does; a
    3-d linear returns (B, T, C) laid out as (T, B, C)."""
    sdpa, linear = F.scaled_dot_product_attention, F.linear
    calls = {"sdpa": 0, "linear": 0}

    def odd_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        out = sdpa(*args, **kwargs)
        return _swap_strides(out, (1, 2)) if out.dim() == 4 and out.shape[1] > 1 and out.shape[2] > 1 else out

    def odd_linear(*args, **kwargs):
        calls["linear"] += 1
        out = linear(*args, **kwargs)
        return _swap_strides(out, (0, 1)) if out.dim() == 3 and out.shape[0] > 1 and out.shape[1] > 1 else out

    monkeypatch.setattr(F, "scaled_dot_product_attention", odd_sdpa)
    monkeypatch.setattr(F, "linear", odd_linear)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "opt"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_tokens_do_not_depend_on_the_kernels_memory_layout(arch, kv_heads, tiny_models_cache, tmp_path, request):
    overrides = {} if arch == "opt" else dict(num_attention_heads=8, num_key_value_heads=kv_heads)
    if arch == "opt" and kv_heads != 1:
        pytest.skip("OPT has no grouped-query attention")
    model_dir = tiny_models_cache.get(arch, **overrides)
    prompts = unambiguous_prompts(model_dir, LENGTHS, NEW_TOKENS, seed=3)
    want = [hf_greedy(model_dir, p, NEW_TOKENS) for p in prompts]  # before the kernels are wrapped
    calls = request.getfixturevalue("odd_kernel_layouts")
    policy = Policy(**_ALL_ON_DEVICE, gpu_batch_size=2, num_gpu_batches=2)
    with LLM(str(model_dir), policy=policy, offload_dir=str(tmp_path), runtime=Runtime(device="cpu")) as llm:
        result = llm.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert calls["sdpa"] > 0 and calls["linear"] > 0, "the wrapped kernels were not used"
    assert [list(out.output_ids) for out in result.outputs] == want


_CACHE_ON = {  # the cache on one tier (weights and activations on the compute device)
    "gpu": _ALL_ON_DEVICE,
    "cpu": dict(_ALL_ON_DEVICE, cache_gpu_percent=0, cache_cpu_percent=100),
    "disk": dict(_ALL_ON_DEVICE, cache_gpu_percent=0, cache_cpu_percent=0),
}


@pytest.mark.parametrize("arch,tier", [("llama", "gpu"), ("opt", "gpu"), ("llama", "cpu"), ("llama", "disk"), ("opt", "disk")])
def test_attention_reads_a_heads_major_cache_with_the_same_tokens(arch, tier, tiny_models_cache, monkeypatch, tmp_path):
    """Decode attention reads each head's positions: the KV view attention reads is laid out
    (B, nkv, S, hd) under its (S, B, nkv, hd) indexing (SDPA over position-major rows runs 3-5x
    slower on a CPU): the cache itself where attention reads it in place (the compute device; host
    memory on a machine without a GPU), else the scratch pair a disk-tier cache is loaded into.
    Writes at a position and reads of positions see the same values as before."""
    from flexgen_dist.engine.block_io import BlockIO

    model = tiny_models_cache.get(arch, num_key_value_heads=2) if arch == "llama" else tiny_models_cache.get(arch)
    layouts = []
    real_lease = BlockIO.lease_for_compute

    def recording_lease(self, state, layer_idx, batch_idx, loaded):
        view = real_lease(self, state, layer_idx, batch_idx, loaded)
        for t in (view.k, view.v):
            data = getattr(t, "data", t)  # a tier tensor's memory, or the tensor itself
            seq, batch, heads, dim = data.shape
            layouts.append((data.stride(), (heads * seq * dim, seq * dim, dim, 1), seq))
        return view

    monkeypatch.setattr(BlockIO, "lease_for_compute", recording_lease)
    prompts = unambiguous_prompts(model, LENGTHS, NEW_TOKENS, seed=5)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, **_CACHE_ON[tier])
    with LLM(str(model), policy=policy, offload_dir=str(tmp_path), runtime=Runtime(device="cpu")) as llm:
        result = llm.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert layouts and all(seq > 1 for *_, seq in layouts)
    for stride, expected, _ in layouts:  # (S, B, nkv, hd) indexing over (B, nkv, S, hd) memory
        assert (stride[1], stride[2], stride[0], stride[3]) == expected
    for prompt, out in zip(prompts, result.outputs):
        assert list(out.output_ids) == hf_greedy(model, prompt, NEW_TOKENS)


def test_refilled_rows_do_not_depend_on_the_kernels_memory_layout(tiny_models_cache, tmp_path, request):
    """Refill's mixed step: the new prompts' tokens beside the batch's rows in every matmul, split
    and reshaped back, and their own attention; with kernels returning other layouts (as CUDA's)."""
    model_dir = tiny_models_cache.get("llama", num_attention_heads=8, num_key_value_heads=2)
    prompts = unambiguous_prompts(model_dir, LENGTHS + (7, 4, 10, 6), NEW_TOKENS, seed=3)
    want = [hf_greedy(model_dir, p, NEW_TOKENS) for p in prompts]  # before the kernels are wrapped
    calls = request.getfixturevalue("odd_kernel_layouts")
    policy = Policy(**_ALL_ON_DEVICE, gpu_batch_size=2, num_gpu_batches=1)  # 4 blocks: 3 lend their prompts
    with LLM(str(model_dir), policy=policy, offload_dir=str(tmp_path), runtime=Runtime(device="cpu")) as llm:
        result = llm.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert calls["sdpa"] > 0 and calls["linear"] > 0, "the wrapped kernels were not used"
    assert result.stats.prefill_sequences == 2  # the others started in refilled rows
    assert [list(out.output_ids) for out in result.outputs] == want
