"""cpu_cache_compute: decode attention over the host-memory cache in place gives transformers'
tokens, and overlap on or off gives the same tokens."""

import pytest

from flexgen_dist import LLM, Policy, Runtime

CPU = Runtime(device="cpu")  # the references are fp32 on the CPU

POLICIES = {
    "cache all on cpu": Policy(cache_gpu_percent=0, cache_cpu_percent=100, cpu_cache_compute=True,
                               gpu_batch_size=2, num_gpu_batches=2),
    "cache split gpu/cpu/disk": Policy(cache_gpu_percent=30, cache_cpu_percent=40, cpu_cache_compute=True,
                                       gpu_batch_size=1, num_gpu_batches=3, w_gpu_percent=50, w_cpu_percent=50),
}


@pytest.mark.parametrize("arch", ["llama", "opt", "mistral"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_cpu_attention_matches_transformers(request, tmp_path, hf_greedy, unambiguous_prompts, arch, name):
    model = request.getfixturevalue(f"{arch}_dir")
    prompts = unambiguous_prompts(model, [3, 9, 14, 6, 11], 10, seed=5)
    with LLM(model, policy=POLICIES[name], offload_dir=tmp_path, runtime=CPU) as llm:
        got = [o.output_ids for o in llm.generate(prompts, max_new_tokens=10).outputs]
    assert got == [hf_greedy(model, p, 10) for p in prompts]


def test_overlap_off_gives_identical_tokens(llama_dir, tmp_path, unambiguous_prompts):
    prompts = unambiguous_prompts(llama_dir, [4, 12, 7], 8, seed=2)
    policy = Policy(w_gpu_percent=20, w_cpu_percent=30, cache_gpu_percent=50, cache_cpu_percent=0,
                    act_gpu_percent=50, act_cpu_percent=0, gpu_batch_size=1, num_gpu_batches=2)
    outs = []
    for overlap in (True, False):
        with LLM(llama_dir, policy=policy.replace(overlap=overlap), offload_dir=tmp_path, runtime=CPU) as llm:
            outs.append([o.output_ids for o in llm.generate(prompts, max_new_tokens=8).outputs])
    assert outs[0] == outs[1]
