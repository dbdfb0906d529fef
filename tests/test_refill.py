"""Continuous refill (engine/refill.py): a row whose sequence finished takes the next waiting
prompt inside its block, its prefill in the same layer pass as the other rows' decode step.

Every sequence must come out as it would alone: transformers' greedy tokens (fp32, CPU) cut at its
own limit or stop id, whichever row and step served it, with the cache in memory, on the host or
on disk, and with a sliding window; and the same with `refill=False`, which runs each block until
its longest row ends. Refill computes fewer row-steps for the same tokens (the point of it).
"""

from __future__ import annotations

import json

import pytest

from flexgen_dist import LLM, Policy, Runtime
from flexgen_dist.api.generation import RunSettings
from flexgen_dist.jobs.config import tokenize_job
from flexgen_dist.jobs.inputs import read_job_file
from flexgen_dist.planning.compression import CompressionConfig

_ON_DEVICE = dict(w_gpu_percent=100, w_cpu_percent=0, cache_gpu_percent=100, cache_cpu_percent=0,
                  act_gpu_percent=100, act_cpu_percent=0)
POLICIES = {
    "in-memory": dict(_ON_DEVICE, gpu_batch_size=2, num_gpu_batches=2),
    # a cache loaded into scratch and stored back: the slots a refill writes go to the tier too
    "cache-on-disk": dict(_ON_DEVICE, gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=50,
                          cache_gpu_percent=0, cache_cpu_percent=30, act_gpu_percent=0, act_cpu_percent=100),
    "one-batch-of-3": dict(_ON_DEVICE, gpu_batch_size=3, num_gpu_batches=1),
    # the new prompts' hidden state waits between layers in a file beside the batch's
    "activations-on-disk": dict(_ON_DEVICE, gpu_batch_size=2, num_gpu_batches=2, act_gpu_percent=0),
}
LENGTHS = (3, 17, 8, 12, 5, 20, 9, 6, 14, 4)
LIMITS = (1, 12, 3, 7, 12, 2, 9, 5, 11, 4)  # the 20-token prompt stops at 2: its slots are reused
MAX_NEW = 12


def _job(tmp_path, prompts, stop_ids):
    """A job of token-id prompts, each with its own limit (and the fourth with a stop id)."""
    path = tmp_path / "job.jsonl"
    lines = [dict(id=i, input_ids=p, max_new_tokens=n) for i, (p, n) in enumerate(zip(prompts, LIMITS))]
    lines[3]["stop_token_ids"] = stop_ids
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _run(model_dir, path, policy, offload_dir, refill, **settings):
    with LLM(str(model_dir), policy=Policy(**policy), offload_dir=str(offload_dir),
             runtime=Runtime(device="cpu", refill=refill)) as llm:
        prepared = tokenize_job(read_job_file(path, None), tokenizer=None, spec=llm.spec,
                                max_new_tokens=MAX_NEW, truncate="none", stop=())
        found = {}
        stats = llm.generate_requests(prepared, RunSettings(max_new_tokens=MAX_NEW, **settings),
                                      lambda items: found.update((p.request.id, c) for p, c in items))
    return found, stats


# Gemma 3: local and global layers, each with its own mask, in the mixed step too
@pytest.mark.parametrize("arch", ["llama", "mistral", "opt", "gemma3", "gemma3-linear-softcap"])
@pytest.mark.parametrize("setup", sorted(POLICIES))
def test_every_sequence_gets_transformers_tokens_whichever_row_served_it(
        arch, setup, tiny_models_cache, tmp_path, hf_greedy, unambiguous_prompts):
    model_dir = tiny_models_cache[arch]
    prompts = unambiguous_prompts(model_dir, LENGTHS, MAX_NEW)
    refs = [hf_greedy(model_dir, p, MAX_NEW) for p in prompts]
    stop_id = refs[3][2]  # the fourth stops at its third token (or earlier where that id came first)
    expected = [ref[:limit] for ref, limit in zip(refs, LIMITS)]
    expected[3] = expected[3][:expected[3].index(stop_id) + 1]
    path = _job(tmp_path, prompts, [stop_id])
    got, stats = _run(model_dir, path, POLICIES[setup], tmp_path / "off", refill=True)
    assert [list(got[i].output_ids) for i in range(len(prompts))] == expected
    assert got[3].finish_reason == "stop" and got[1].finish_reason == "length"
    plain, plain_stats = _run(model_dir, path, POLICIES[setup], tmp_path / "off", refill=False)
    assert [list(plain[i].output_ids) for i in range(len(prompts))] == expected
    assert stats.generated_tokens == plain_stats.generated_tokens == sum(map(len, expected))
    assert stats.row_steps < plain_stats.row_steps  # finished rows took new prompts instead of idling


def test_the_cache_ring_wraps_many_times(llama_dir, tmp_path, hf_greedy, unambiguous_prompts):
    """Two rows, 14 prompts of limits up to 6 on prompts of up to 9: the block's 15 slots per row
    go round several times, new prompts taking slots that wrap past the end."""
    lengths = (9, 2, 7, 4, 9, 3, 8, 5, 6, 9, 2, 7, 3, 8)
    limits = (6, 1, 4, 6, 2, 5, 3, 6, 1, 4, 6, 2, 5, 3)
    prompts = unambiguous_prompts(llama_dir, lengths, 6)
    path = tmp_path / "job.jsonl"
    path.write_text("".join(json.dumps(dict(id=i, input_ids=p, max_new_tokens=n)) + "\n"
                            for i, (p, n) in enumerate(zip(prompts, limits))))
    policy = dict(_ON_DEVICE, gpu_batch_size=2, num_gpu_batches=1)
    with LLM(str(llama_dir), policy=Policy(**policy), runtime=Runtime(device="cpu")) as llm:
        prepared = tokenize_job(read_job_file(path, None), tokenizer=None, spec=llm.spec, max_new_tokens=6,
                                truncate="none", stop=())
        found = {}
        stats = llm.generate_requests(prepared, RunSettings(max_new_tokens=6),
                                      lambda items: found.update((p.request.id, c) for p, c in items))
    assert [list(found[i].output_ids) for i in range(len(prompts))] == \
        [hf_greedy(llama_dir, p, 6)[:n] for p, n in zip(prompts, limits)]
    steps = stats.row_steps // 2
    assert steps > 15 + 6  # the ring (9 + 6 slots) went round more than once
    assert stats.generated_tokens == sum(limits)


def test_sampled_sequences_do_not_depend_on_refill(llama_dir, tmp_path, unambiguous_prompts):
    """Each sequence draws from its own generator, seeded by its index: the row and step that
    served it change nothing."""
    prompts = unambiguous_prompts(llama_dir, LENGTHS, MAX_NEW)
    path = _job(tmp_path, prompts, [])
    policy = POLICIES["in-memory"]
    sampled = dict(do_sample=True, temperature=1.3, top_k=20, seed=7)
    got, _ = _run(llama_dir, path, policy, tmp_path / "off", refill=True, **sampled)
    plain, _ = _run(llama_dir, path, policy, tmp_path / "off", refill=False, **sampled)
    assert {i: list(c.output_ids) for i, c in got.items()} == {i: list(c.output_ids) for i, c in plain.items()}
    greedy, _ = _run(llama_dir, path, policy, tmp_path / "off", refill=True)
    assert {i: list(c.output_ids) for i, c in got.items()} != {i: list(c.output_ids) for i, c in greedy.items()}


@pytest.mark.parametrize("method", ["minmax", "kivi"])
@pytest.mark.parametrize("setup", ["in-memory", "cache-on-disk"])
def test_compressed_cache_refills_within_its_tolerance(method, setup, llama_dir, tmp_path, unambiguous_prompts):
    """A 4-bit cache is written by runs of slots read, replaced in the new rows and quantized
    again (KIVI's keys: their groups of slots quantized again; groups of 4 slots here, so the
    ring's 32 slots make 8 groups, each completed and requantized many times as the ring turns):
    each sequence keeps its own limit and count, and agrees with the run without refill on most
    tokens (both are 4-bit approximations)."""
    prompts = unambiguous_prompts(llama_dir, LENGTHS, MAX_NEW)
    path = _job(tmp_path, prompts, [])
    group = 4 if method == "kivi" else 64
    policy = dict(POLICIES[setup], compress_cache=True, compression=CompressionConfig(group_size=group, cache_method=method))
    got, stats = _run(llama_dir, path, policy, tmp_path / "off", refill=True, ignore_eos=True)
    plain, plain_stats = _run(llama_dir, path, policy, tmp_path / "off", refill=False, ignore_eos=True)
    assert [len(got[i].output_ids) for i in range(len(prompts))] == list(LIMITS)
    same = sum(a == b for i in got for a, b in zip(got[i].output_ids, plain[i].output_ids))
    assert same >= 0.8 * sum(LIMITS)
    assert stats.row_steps < plain_stats.row_steps


def test_no_refill_on_the_command_line(cli, llama_dir, tmp_path):
    """--no-refill runs each block to its longest row: more row-steps for the same tokens."""
    job = tmp_path / "job.jsonl"
    job.write_text("".join(json.dumps(dict(id=i, input_ids=[5 + i] * (3 + i), max_new_tokens=1 + (i * 5) % 9)) + "\n"
                           for i in range(9)))
    steps = {}
    for flag in ((), ("--no-refill",)):
        stats = tmp_path / f"stats{len(flag)}.json"
        code, _, err = cli("--model", str(llama_dir), "--input", str(job), "--output", str(tmp_path / f"out{len(flag)}.jsonl"),
                           "--device", "cpu", "--gpu-batch-size", "2", "--num-gpu-batches", "1", "--ignore-eos",
                           "--stats-json", str(stats), *flag)
        assert code == 0, err
        steps[flag] = json.loads(stats.read_text())
    assert (tmp_path / "out0.jsonl").read_bytes() == (tmp_path / "out1.jsonl").read_bytes()
    refill, plain = steps[()], steps[("--no-refill",)]
    assert refill["generated_tokens"] == plain["generated_tokens"]
    assert refill["row_utilization"] > plain["row_utilization"]


def test_a_sliding_window_counts_positions_round_the_ring(tmp_path, unambiguous_prompts):
    """A window of 5 tokens, shorter than the sequences: which keys a query sees is counted in
    positions, not in slots (the ring puts a row's tokens in any slot order)."""
    import tiny_models

    model_dir = tiny_models.make_tiny_model("mistral", tmp_path / "mistral-w5", sliding_window=5)
    prompts = unambiguous_prompts(model_dir, LENGTHS, MAX_NEW)
    path = _job(tmp_path, prompts, [])
    got, stats = _run(model_dir, path, POLICIES["in-memory"], tmp_path / "off", refill=True, ignore_eos=True)
    plain, plain_stats = _run(model_dir, path, POLICIES["in-memory"], tmp_path / "off", refill=False, ignore_eos=True)
    assert {i: list(c.output_ids) for i, c in got.items()} == {i: list(c.output_ids) for i, c in plain.items()}
    assert stats.row_steps < plain_stats.row_steps
    wide = tiny_models.make_tiny_model("mistral", tmp_path / "mistral-w96")  # the window matters here
    other, _ = _run(wide, path, POLICIES["in-memory"], tmp_path / "off", refill=True, ignore_eos=True)
    assert {i: list(c.output_ids) for i, c in got.items()} != {i: list(c.output_ids) for i, c in other.items()}


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_pipeline_refills_its_lanes_with_the_same_tokens(ranks, tiny_models_cache, tmp_path, hf_greedy,
                                                           unambiguous_prompts):
    """Every lane of a pipeline keeps one block open; the first rank (which records the tokens)
    and the last (which samples them) decide alike which rows end and which prompt each takes,
    and the ranks between learn it from the control message before each task. Every tensor a
    rank receives (the control message naming the starting rows, the new prompts' hidden states)
    arrives as on another device (NCCL's GPU) and must be moved at the comm boundary first."""
    from test_engine_pipeline import OnAnotherDevice, Wire, run_ranks

    model_dir = tiny_models_cache.get("llama", num_hidden_layers=4)
    lengths = LENGTHS + (7, 15, 3, 11, 6, 9)
    limits = LIMITS + (6, 1, 12, 4, 8, 3)
    prompts = unambiguous_prompts(model_dir, lengths, MAX_NEW)
    expected = [hf_greedy(model_dir, p, MAX_NEW)[:n] for p, n in zip(prompts, limits)]
    path = tmp_path / "job.jsonl"
    path.write_text("".join(json.dumps(dict(id=i, input_ids=p, max_new_tokens=n)) + "\n"
                            for i, (p, n) in enumerate(zip(prompts, limits))))
    # a quarter of the cache on disk: the first stage ends on a layer whose new prompts' slots are
    # stored to their tier after the step's inputs are forgotten
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=50, w_cpu_percent=50,
                    cache_gpu_percent=50, cache_cpu_percent=25)
    found = {}

    def body(llm):
        prepared = tokenize_job(read_job_file(path, None), tokenizer=None, spec=llm.spec,
                                max_new_tokens=MAX_NEW, truncate="none", stop=())
        return llm.generate_requests(prepared, RunSettings(max_new_tokens=MAX_NEW),
                                     lambda items: found.update((p.request.id, c) for p, c in items))

    OnAnotherDevice.misuses.clear()
    stats, _ = run_ranks(model_dir, policy, ranks, tmp_path, body,
                         Wire(arrive=lambda tensor: tensor.as_subclass(OnAnotherDevice)))
    assert not OnAnotherDevice.misuses
    assert [list(found[i].output_ids) for i in range(len(prompts))] == expected
    # 16 prompts in blocks of 4: each lane's block took prompts of the blocks no lane opened, and
    # computed fewer row-steps than the blocks run to their longest rows (4 blocks x 4 rows x 12)
    assert stats[0].generated_tokens == sum(limits)
    assert stats[0].row_steps < 4 * 4 * MAX_NEW


def test_prefill_and_decode_rates_count_where_prompts_ran(llama_dir, tmp_path, unambiguous_prompts):
    """With refill most prompts start in a row of an open block, their prefill inside a decode
    step: the prefill rate counts only the prompts of the prefill phase (the lanes' blocks), and
    the decode rate every token but those prompts' first ones."""
    prompts = unambiguous_prompts(llama_dir, LENGTHS, MAX_NEW)
    path = _job(tmp_path, prompts, [])
    _, stats = _run(llama_dir, path, POLICIES["in-memory"], tmp_path / "off", refill=True)
    first_block = sorted(LENGTHS, reverse=True)[:4]  # blocks are filled longest prompt first
    assert stats.prefill_prompt_tokens == sum(first_block) and stats.prefill_sequences == 4
    assert stats.prefill_tokens_per_s == pytest.approx(sum(first_block) / stats.prefill_s)
    assert stats.decode_tokens_per_s == pytest.approx((stats.generated_tokens - 4) / stats.decode_s)
    _, plain = _run(llama_dir, path, POLICIES["in-memory"], tmp_path / "off", refill=False)
    assert plain.prefill_prompt_tokens == sum(LENGTHS) and plain.prefill_sequences == len(LENGTHS)
