"""On a CUDA GPU the engine computes in 16 bits; its greedy tokens agree with transformers' fp32
CPU reference wherever the reference's choice is clear at 16-bit precision.

Tolerance. The engine picks the device itself (CUDA when available) and computes in fp16 there
(the checkpoints are fp32). On the tiny models (logits of std ~10, |logit| up to ~45), the whole
of transformers cast to fp16 differs from fp32 by at most 0.46 in any logit (measured on all
archs, 12 prompts of 12..28 tokens). FP16_LOGIT_TOL = 1.0 is about twice that. A greedy step
whose fp32 top1 - top2 gap exceeds it must pick the same token in fp16; after the first step
whose gap does not, the two paths may part and nothing more is compared for that prompt. So for
each prompt we compare the longest prefix of steps whose reference gaps all exceed the tolerance
(the first token included, where its gap does), and require enough compared tokens overall.
"""

from __future__ import annotations

import pytest
import torch

from conftest import hf_trace
import tiny_models

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FP16_LOGIT_TOL = 1.0

_ALL_ON_DEVICE = dict(w_gpu_percent=100, w_cpu_percent=0, cache_gpu_percent=100,
                      cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0)
POLICIES = {
    "all-on-device": dict(_ALL_ON_DEVICE, gpu_batch_size=8, num_gpu_batches=2),
    # Weights on gpu / pinned host / disk, cache half on the GPU and half on the host.
    "mixed-tiers": dict(_ALL_ON_DEVICE, gpu_batch_size=4, num_gpu_batches=2,
                        w_gpu_percent=30, w_cpu_percent=30,
                        cache_gpu_percent=50, cache_cpu_percent=50),
}
CASES = [(arch, "all-on-device") for arch in tiny_models.ARCHS] + [
    ("llama", "mixed-tiers"), ("opt", "mixed-tiers"), ("qwen2", "mixed-tiers")]

PROMPT_LENGTHS = (3, 20, 5, 17, 8, 12, 4, 14, 6, 19, 9, 11, 7, 15, 10, 13)
MAX_NEW_TOKENS = 8


def check_16bit_against_fp32(model_dir, policy: dict, offload_dir, **llm_kwargs):
    """Run the engine with its own device choice; return (tokens compared, the LLM)."""
    from flexgen_dist import LLM, Policy

    prompts = tiny_models.random_prompts(PROMPT_LENGTHS, seed=31)
    llm = LLM(str(model_dir), policy=Policy(**policy), offload_dir=str(offload_dir), **llm_kwargs)
    result = llm.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    compared = 0
    for i, (prompt, out) in enumerate(zip(prompts, result.outputs)):
        want, gaps = hf_trace(model_dir, prompt, MAX_NEW_TOKENS)
        clear = 0
        while clear < len(want) and gaps[clear] > FP16_LOGIT_TOL:
            clear += 1
        got = list(out.output_ids)[:clear]
        assert got == want[:clear], (
            f"prompt {i}: the first {clear} reference steps are clear (top1 - top2 > "
            f"{FP16_LOGIT_TOL}, gaps {[round(g, 2) for g in gaps[:clear]]}) but the engine gave "
            f"{list(out.output_ids)} and transformers fp32 {want}")
        compared += clear
    return compared, llm


@pytest.mark.parametrize(("arch", "policy_name"), CASES, ids=[f"{a}-{p}" for a, p in CASES])
def test_16bit_on_gpu_matches_fp32_reference(arch, policy_name, tiny_models_cache, tmp_path):
    model_dir = tiny_models_cache[arch]
    compared, llm = check_16bit_against_fp32(model_dir, POLICIES[policy_name], tmp_path)
    assert compared >= len(PROMPT_LENGTHS), f"only {compared} tokens had a clear reference"
    # The engine chose the GPU and 16-bit compute by itself, and its tensors are there.
    assert llm.device == torch.device(f"cuda:{torch.cuda.current_device()}")
    assert llm.placement.dtypes.compute in ("float16", "bfloat16")
    resident = [t.data for placed in llm.weights.tensors.values() for t in placed.values() if t.tier.value == "gpu"]
    assert resident and all(t.device == llm.device for t in resident)


# ---------------------------------------------------------------- the GPU path's own guarantees

def _big_llama(tmp_path_factory):
    """A random Llama large enough that loads and compute take real time on a GPU."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512)


SLEEP_CYCLES = 100_000_000  # ~50 ms of a ~2 GHz GPU: longer than a layer's disk read


def test_overlap_on_and_off_give_bitwise_equal_tokens(tmp_path, tmp_path_factory, monkeypatch):
    """Every device slot is given back while the compute stream is held up (a sleep queued just
    before), so the kernels that read it have not run yet when the next load may write it: a load
    that does not wait for the slot's event (or copies on another stream than the one that
    waited) overwrites weights still to be read, and the tokens change. The disk-tier weights are
    over 8 MiB, so their reads are cut into chunks copied from the reader's threads."""
    from flexgen_dist import LLM, Policy
    from flexgen_dist.storage.slots import SlotPool
    from flexgen_dist.storage.tiers import DiskTensor

    real_give = SlotPool.give

    def give_late(self, slot):
        if slot.data.is_cuda:
            torch.cuda._sleep(SLEEP_CYCLES)  # on the giving (compute) thread's stream
        real_give(self, slot)

    monkeypatch.setattr(SlotPool, "give", give_late)
    # weights on gpu / pinned host / disk (the MLP's up and down projections, 11 MiB each in
    # float32), cache half on the host: every step loads over the link and from the disk
    policy = Policy(gpu_batch_size=8, num_gpu_batches=2, w_gpu_percent=20, w_cpu_percent=30,
                    cache_gpu_percent=50, cache_cpu_percent=50)
    prompts = tiny_models.random_prompts([40, 64, 17, 50] * 4, seed=3)
    outs = []
    for overlap in (True, False):
        with LLM.from_config(_big_llama(tmp_path_factory), seed=1, policy=policy.replace(overlap=overlap),
                             offload_dir=tmp_path) as llm:
            on_disk = [t for placed in llm.weights.tensors.values() for t in placed.values() if isinstance(t, DiskTensor)]
            assert any(t.nbytes > 8 << 20 and t.nbytes > llm.reader.buffer_bytes for t in on_disk)
            outs.append([o.output_ids for o in llm.generate(prompts, max_new_tokens=8).outputs])
    assert outs[0] == outs[1]


def test_cuda_and_cuda_0_are_one_device(tmp_path, llama_dir):
    from flexgen_dist import LLM, Policy, Runtime

    outs, devices = [], []
    for name in ("cuda", "cuda:0"):
        with LLM(llama_dir, policy=Policy(gpu_batch_size=4), runtime=Runtime(device=name)) as llm:
            devices.append(llm.device)
            outs.append([o.output_ids for o in llm.generate(tiny_models.random_prompts([5, 9, 12], seed=1), max_new_tokens=6).outputs])
    assert devices == [torch.device("cuda:0")] * 2 and outs[0] == outs[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_one_process_on_the_second_gpu(llama_dir, tmp_path):
    """`--device cuda:1` in a process whose current device is 0: the tokens are right and
    nothing is allocated on GPU 0 (streams, events, pinned memory all on GPU 1)."""
    from flexgen_dist import Runtime

    policy = POLICIES["mixed-tiers"]  # weights on gpu, pinned host and disk
    before = torch.cuda.current_device()
    torch.cuda.set_device(0)
    try:
        on_gpu0 = torch.cuda.memory_allocated(0)
        compared, llm = check_16bit_against_fp32(llama_dir, policy, tmp_path, runtime=Runtime(device="cuda:1"))
        try:
            assert llm.device == torch.device("cuda:1") and torch.cuda.current_device() == 1
            assert compared >= len(PROMPT_LENGTHS)
            resident = [t.data for placed in llm.weights.tensors.values() for t in placed.values() if t.tier.value == "gpu"]
            assert resident and all(t.device == llm.device for t in resident)
            assert torch.cuda.memory_allocated(0) == on_gpu0
        finally:
            llm.close()
    finally:
        torch.cuda.set_device(before)


def test_pinned_host_memory_is_unpinned_when_its_pool_is_dropped():
    import gc

    from flexgen_dist.storage.slots import SlotPool

    pool = SlotPool(2, 1 << 20, torch.device("cpu"), pin=torch.device("cuda", torch.cuda.current_device()))
    data = [slot.data for slot in pool.slots]  # kept: the memory outlives the pool, its pinning does not
    assert all(d.is_pinned() for d in data)
    pool.cycle = pool
    del pool
    gc.collect()
    assert not any(d.is_pinned() for d in data)


def test_sampling_on_the_gpu_does_not_depend_on_the_block(llama_dir):
    from flexgen_dist import LLM, Policy

    prompts = tiny_models.random_prompts([5, 9, 12, 7], seed=2)
    with LLM(llama_dir, policy=Policy(gpu_batch_size=2, num_gpu_batches=2)) as llm:
        a = [o.output_ids for o in llm.generate(prompts, max_new_tokens=8, do_sample=True, seed=4).outputs]
        b = [o.output_ids for o in llm.generate(prompts[::-1], max_new_tokens=8, do_sample=True, seed=4).outputs]
    assert a == b[::-1]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_cpu_attention_on_the_gpu_machine(arch, tiny_models_cache, tmp_path):
    policy = dict(_ALL_ON_DEVICE, gpu_batch_size=4, num_gpu_batches=2, cache_gpu_percent=0, cache_cpu_percent=100,
                  cpu_cache_compute=True)
    compared, llm = check_16bit_against_fp32(tiny_models_cache[arch], policy, tmp_path)
    assert compared >= len(PROMPT_LENGTHS)
    assert all(c.in_place for c in llm.placement.caches.values())


def test_gpu_memory_returns_to_its_baseline_after_generate(llama_dir, tmp_path):
    from flexgen_dist import LLM, Policy

    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, w_gpu_percent=50, w_cpu_percent=50,
                    cache_gpu_percent=50, cache_cpu_percent=50)
    with LLM(llama_dir, policy=policy, offload_dir=tmp_path) as llm:
        # warm up first: cuBLAS allocates its workspaces on the first matmul of each stream and
        # keeps them (counted by memory_allocated); what must not grow is what a run leaves behind
        llm.generate(tiny_models.random_prompts([5, 30, 12, 7, 21], seed=4), max_new_tokens=8)
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        for _ in range(2):
            llm.generate(tiny_models.random_prompts([5, 30, 12, 7, 21], seed=5), max_new_tokens=8)
            torch.cuda.synchronize()
            assert torch.cuda.memory_allocated() == baseline


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for NCCL (one GPU per rank)")
def test_two_ranks_over_nccl_equal_one_process(tmp_path, tiny_models_cache):
    import json
    import os
    import subprocess
    import sys

    model = tiny_models_cache.get("llama", num_hidden_layers=4)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "input_ids": p}) + "\n"
                           for i, p in enumerate(tiny_models.random_prompts([5, 9, 12, 7, 3, 14], seed=6))))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outs = []
    for launch in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]):
        out = tmp_path / f"out{len(outs)}.jsonl"
        cmd = [*launch, "-m", "flexgen_dist.run", "--model", str(model), "--input", str(src), "--output", str(out),
               "--gen-len", "6", "--gpu-batch-size", "2", "--no-warmup"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append([json.loads(line)["output_ids"] for line in out.read_text().splitlines()])
    assert outs[0] == outs[1]
