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
