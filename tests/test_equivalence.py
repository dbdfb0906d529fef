"""Greedy output of `LLM.generate` equals transformers' `generate` for each prompt alone.

Tiny random checkpoints (tests/tiny_models.py) of every supported architecture, fp32 on the CPU,
under policies that put weights, KV cache and activations on every tier and cut blocks in
several ways. Each prompt's reference is transformers' greedy `generate` on that prompt alone
(no padding), so a batch, a left-pad or a block boundary that leaks into a result shows.
Every reference path is checked to be unambiguous (top1 - top2 >= conftest.MIN_MARGIN).

Every arch runs under every setup (the MATRIX below). Extra tests: a sharded checkpoint, reuse
of disk weights by a second LLM, stop ids, EOS from the config, and text prompts; and one that
checks the fixture models themselves (clear greedy choices, varied and context-dependent output).
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from flexgen_dist import LLM, Policy, Runtime
from conftest import MIN_MARGIN, hf_greedy, hf_trace, unambiguous_prompts
import tiny_models


_ALL_ON_DEVICE = dict(w_gpu_percent=100, w_cpu_percent=0, cache_gpu_percent=100,
                      cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0)


@dataclasses.dataclass(frozen=True)
class Setup:
    """A policy and the prompts it runs on."""

    policy: dict
    lengths: tuple[int, ...]
    max_new_tokens: int


SETUPS = {
    # Everything on the compute device, one GPU batch of equal-length prompts: the plain path.
    "all-on-device": Setup(dict(_ALL_ON_DEVICE, gpu_batch_size=4, num_gpu_batches=1),
                           (8, 8, 8, 8), 12),
    # Every weight read from files in offload_dir.
    "weights-on-disk": Setup(dict(_ALL_ON_DEVICE, gpu_batch_size=4, num_gpu_batches=1,
                                  w_gpu_percent=0, w_cpu_percent=0),
                             (5, 9, 9, 14), 12),
    # Weights on all three tiers (30 / 30 / disk 40), KV cache half on device, half on host.
    "mixed-tiers": Setup(dict(_ALL_ON_DEVICE, gpu_batch_size=2, num_gpu_batches=2,
                              w_gpu_percent=30, w_cpu_percent=30,
                              cache_gpu_percent=50, cache_cpu_percent=50),
                         (6, 11, 4, 15), 12),
    # Beyond the brief's list: KV cache mostly on disk, activations on the host.
    "cache-on-disk": Setup(dict(_ALL_ON_DEVICE, gpu_batch_size=2, num_gpu_batches=2,
                                w_gpu_percent=20, w_cpu_percent=30,
                                cache_gpu_percent=0, cache_cpu_percent=40,
                                act_gpu_percent=0, act_cpu_percent=100),
                           (7, 13, 3, 18, 10), 12),
    # Weights, KV cache and activations all on disk.
    "all-on-disk": Setup(dict(gpu_batch_size=2, num_gpu_batches=2,
                              w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0,
                              cache_cpu_percent=0, act_gpu_percent=0, act_cpu_percent=0),
                         (4, 16, 9), 10),
    # Blocks of 3 GPU batches of 2; 7 prompts, so the last block is not full.
    "gpu-batches": Setup(dict(_ALL_ON_DEVICE, gpu_batch_size=2, num_gpu_batches=3),
                         (3, 17, 8, 12, 5, 20, 9), 10),
    # Prompts of lengths 3..20 in one block (left padding, positions, masks).
    "varied-lengths": Setup(dict(_ALL_ON_DEVICE, gpu_batch_size=4, num_gpu_batches=2),
                            (3, 20, 5, 17, 8, 12, 4, 14), 16),
}

# Every arch under every setup: with one intra-op thread (conftest) the whole product runs in
# a few seconds, so there is no need to thin it out.
MATRIX = [(arch, name) for arch in tiny_models.ARCHS for name in SETUPS]


def _generate(model_dir, prompts, setup_or_policy, max_new_tokens, offload_dir, **kwargs):
    policy = setup_or_policy.policy if isinstance(setup_or_policy, Setup) else setup_or_policy
    # fp32 on the CPU, as the reference (a GPU machine would otherwise pick CUDA in 16 bits)
    with LLM(str(model_dir), policy=Policy(**policy), offload_dir=str(offload_dir), runtime=Runtime(device="cpu")) as llm:
        return llm.generate(prompts, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


def _assert_outputs_equal(result, model_dir, prompts, max_new_tokens):
    assert len(result.outputs) == len(prompts)
    mismatches = []
    for i, prompt in enumerate(prompts):
        want = hf_greedy(model_dir, prompt, max_new_tokens)
        got = list(result.outputs[i].output_ids)
        if got != want:
            mismatches.append(f"prompt {i} (length {len(prompt)}): engine {got} != transformers {want}")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize(("arch", "setup_name"), MATRIX, ids=[f"{a}-{s}" for a, s in MATRIX])
def test_greedy_matches_transformers(arch, setup_name, tiny_models_cache, tmp_path):
    setup = SETUPS[setup_name]
    model_dir = tiny_models_cache[arch]
    prompts = unambiguous_prompts(model_dir, setup.lengths, setup.max_new_tokens, seed=len(setup.lengths))
    result = _generate(model_dir, prompts, setup, setup.max_new_tokens, tmp_path)
    _assert_outputs_equal(result, model_dir, prompts, setup.max_new_tokens)
    # A checkpoint without tokenizer files gives no text.
    assert all(out.text is None for out in result.outputs)
    assert result.stats.tokens_per_s > 0


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_tiny_model_is_a_good_test_subject(arch, tiny_models_cache):
    """The fixture itself (transformers only): clear greedy choices (unambiguous_prompts finds
    them), continuations that vary, and that depend on far context, not only the last token."""
    model_dir = tiny_models_cache[arch]
    n = 12
    prompts = unambiguous_prompts(model_dir, [12] * 4, n, seed=21)
    distinct = sorted(len(set(hf_greedy(model_dir, p, n))) for p in prompts)
    assert distinct[0] >= 2 and distinct[len(distinct) // 2] >= 4, distinct
    # Change only the first prompt token: the continuation should change (the KV cache matters).
    free = tiny_models.VOCAB_SIZE - tiny_models.FIRST_FREE_ID
    changed = 0
    for p in prompts:
        q = [tiny_models.FIRST_FREE_ID + (p[0] + 50) % free] + p[1:]
        changed += hf_trace(model_dir, q, n)[0] != hf_greedy(model_dir, p, n)
    assert changed >= 3, f"only {changed} of 4 continuations depend on the first prompt token"


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_sharded_checkpoint(arch, tiny_models_cache, tmp_path):
    sharded = tiny_models_cache.get(arch, make_sharded=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    plain = tiny_models_cache[arch]
    setup = SETUPS["mixed-tiers"]
    prompts = unambiguous_prompts(plain, setup.lengths, setup.max_new_tokens, seed=11)
    result = _generate(sharded, prompts, setup, setup.max_new_tokens, tmp_path)
    # Same seed, same weights: the sharded folder must give the unsharded folder's outputs.
    _assert_outputs_equal(result, plain, prompts, setup.max_new_tokens)


def _files_with_mtimes(folder) -> dict[str, tuple[int, int]]:
    """Data files under `folder` (not JSON metadata such as a manifest) with their inode and mtime.
    A file replaced by another (written under a temporary name and renamed) gets a new inode as
    long as the old one is held open (see the test), whatever the clock's resolution."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name.endswith(".json"):
                continue
            path = os.path.join(root, name)
            st = os.stat(path)
            found[os.path.relpath(path, folder)] = (st.st_ino, st.st_mtime_ns)
    return found


def test_second_llm_reuses_disk_weights(llama_dir, tmp_path):
    setup = SETUPS["weights-on-disk"]  # only weights on disk: the cache stays on the device
    prompts = unambiguous_prompts(llama_dir, setup.lengths, setup.max_new_tokens, seed=12)
    first = _generate(llama_dir, prompts, setup, setup.max_new_tokens, tmp_path)
    written = _files_with_mtimes(tmp_path)
    assert written, "weights-on-disk wrote no files into offload_dir"
    held = [open(tmp_path / name, "rb") for name in written]  # their inodes cannot be reused meanwhile
    try:
        second = _generate(llama_dir, prompts, setup, setup.max_new_tokens, tmp_path)
    finally:
        for f in held:
            f.close()
    again = _files_with_mtimes(tmp_path)
    rewritten = [name for name, mtime in written.items() if again.get(name) != mtime]
    assert not rewritten, f"the second LLM rewrote (or removed) {rewritten}"
    _assert_outputs_equal(first, llama_dir, prompts, setup.max_new_tokens)
    _assert_outputs_equal(second, llama_dir, prompts, setup.max_new_tokens)


@pytest.mark.parametrize("arch", ["llama", "opt350m"])
def test_stop_token_ids(arch, tiny_models_cache, tmp_path):
    model_dir = tiny_models_cache[arch]
    setup = SETUPS["gpu-batches"]
    n = setup.max_new_tokens
    prompts = unambiguous_prompts(model_dir, setup.lengths, n, seed=13)
    free = _generate(model_dir, prompts, setup, n, tmp_path)
    _assert_outputs_equal(free, model_dir, prompts, n)
    stop = free.outputs[0].output_ids[2]  # prompt 0 is sure to hit it, by step 2 at the latest
    stopped = _generate(model_dir, prompts, setup, n, tmp_path, stop_token_ids=[stop])
    for i, prompt in enumerate(prompts):
        full = hf_greedy(model_dir, prompt, n)
        want = full[: full.index(stop) + 1] if stop in full else full
        got = list(stopped.outputs[i].output_ids)
        assert got == want, f"prompt {i}: stop id {stop}: engine {got} != {want}"
    assert stopped.outputs[0].output_ids[-1] == stop
    assert len(stopped.outputs[0].output_ids) <= 3


@pytest.mark.parametrize("arch", ["llama-tied", "opt"])
def test_eos_from_config_stops(arch, tiny_models_cache, tmp_path):
    model_dir = tiny_models_cache[arch]
    setup = SETUPS["varied-lengths"]
    n = setup.max_new_tokens
    prompts = unambiguous_prompts(model_dir, setup.lengths, n, seed=14)
    eos = hf_greedy(model_dir, prompts[1], n)[2]
    eos_dir = tiny_models.with_eos(model_dir, tmp_path / "eos_model", eos)
    result = _generate(eos_dir, prompts, setup, n, tmp_path / "offload")
    for i, prompt in enumerate(prompts):
        full = hf_greedy(model_dir, prompt, n)
        want = full[: full.index(eos) + 1] if eos in full else full
        assert hf_greedy(eos_dir, prompt, n) == want  # transformers agrees on what EOS does
        got = list(result.outputs[i].output_ids)
        assert got == want, f"prompt {i}: eos {eos}: engine {got} != {want}"
    assert result.outputs[1].output_ids[-1] == eos


def test_string_prompts(tiny_models_cache, tmp_path):
    from transformers import AutoTokenizer

    model_dir = tiny_models_cache.get("llama", tokenizer=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    n = 10
    # Keep the texts whose reference is clear (the tokenizer maps byte b to token 4 + b).
    texts = []
    for text in ["Hello, world!", "The quick brown fox", "abc", "flexgen: offload all the things",
                 "zig-zag blocks", "KV cache on disk", "1 2 3 4 5", "pipeline ranks"]:
        ids = tokenizer(text)["input_ids"]
        if min(hf_trace(model_dir, ids, n)[1]) >= MIN_MARGIN:
            texts.append(text)
    assert len(texts) >= 3
    texts = texts[:4]
    result = _generate(model_dir, texts, SETUPS["all-on-device"], n, tmp_path)
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        assert ids == [tiny_models.FIRST_FREE_ID + b for b in text.encode()]
        want = hf_greedy(model_dir, ids, n)
        out = result.outputs[i]
        assert list(out.output_ids) == want, f"{text!r}: engine {list(out.output_ids)} != {want}"
        assert out.text in (tokenizer.decode(want, skip_special_tokens=True),
                            tokenizer.decode(want, skip_special_tokens=False))


@pytest.mark.dist
def test_a_rank_holding_one_cache_layer_matches_transformers(tiny_models_cache, tmp_path):
    """Three ranks over a 3-layer model: the middle rank holds one decoder layer, the only one
    with a cache there; one GPU batch and one block make one lane, so each compute's next
    compute reads the rows it stores. The cache is on disk (read into scratch, not in place),
    so a load issued before that store reads stale rows (issue 18, item 10)."""
    import json
    import subprocess
    import sys

    model_dir = tiny_models_cache.get("llama", num_hidden_layers=3)
    n = 8
    prompts = unambiguous_prompts(model_dir, [9, 6], n, seed=18)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"p{i}", "input_ids": p}) + "\n" for i, p in enumerate(prompts)))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
           "-m", "flexgen_dist.run", "--model", str(model_dir), "--input", str(inputs), "--output", str(out),
           "--gen-len", str(n), "--gpu-batch-size", str(len(prompts)), "--num-gpu-batches", "1",
           "--percent", "100", "0", "0", "0", "100", "0", "--stage-layers", "1,1,1",
           "--offload-dir", str(tmp_path / "offload"), "--comm-timeout", "120"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {row["id"]: row["output_ids"] for row in map(json.loads, out.read_text().splitlines())}
    for i, prompt in enumerate(prompts):
        assert got[f"p{i}"] == hf_greedy(model_dir, prompt, n), f"prompt {i}"
