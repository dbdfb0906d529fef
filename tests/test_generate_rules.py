"""Each sequence's own rule inside a shared block: its token limit, stop ids, stop strings
(decoded incrementally) and sampling seeded by its request index, so that its result does not
depend on the block, the batch size or which other prompts ran."""

import json

import pytest

from flexgen_dist import DEFAULT_MODEL, LLM, Policy, Runtime
from flexgen_dist.api.generation import RunSettings
from flexgen_dist.jobs.config import tokenize_job
from flexgen_dist.jobs.inputs import read_job_file
from flexgen_dist.jobs.requests import Shard
from flexgen_dist.api.generation import IncrementalText, StopStringMatcher, trim_at_stop

PROMPTS = ["The list data type has some more methods.", "Return the number of", "This module provides",
           "If the optional argument", "Compound statements contain", "A class definition is"]


def make_llm(model=DEFAULT_MODEL, gpu_batch_size=4, num_gpu_batches=1):
    return LLM(model, policy=Policy(gpu_batch_size=gpu_batch_size, num_gpu_batches=num_gpu_batches),
               runtime=Runtime(device="cpu"))


@pytest.fixture(scope="module")
def llm():
    with make_llm() as llm:
        yield llm


def job(tmp_path, lines, llm, max_new_tokens=16, shard=None):
    path = tmp_path / f"job{len(list(tmp_path.iterdir()))}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return tokenize_job(read_job_file(path, shard), tokenizer=llm.tokenizer, spec=llm.spec,
                        max_new_tokens=max_new_tokens, truncate="none", stop=())


def generate(llm, prepared, **settings):
    found = {}
    llm.generate_requests(prepared, RunSettings(**settings),
                          lambda items: found.update((p.request.id, c) for p, c in items))
    assert len(found) == len(prepared)
    return found


def test_each_row_stops_at_its_own_limit_in_a_shared_block(llm, tmp_path):
    limits = [2, 5, 9, 16]
    lines = [{"id": i, "prompt": PROMPTS[i], "max_new_tokens": n} for i, n in enumerate(limits)]
    got = generate(llm, job(tmp_path, lines, llm), ignore_eos=True)
    full = llm.generate(PROMPTS[:4], max_new_tokens=16, ignore_eos=True).outputs
    for i, n in enumerate(limits):
        assert list(got[i].output_ids) == full[i].output_ids[:n]
        assert got[i].finish_reason == "length"
        assert got[i].prompt_tokens == len(full[i].prompt_ids)


def test_positions_stop_at_each_rows_own_end(opt_dir, tmp_path):
    """A long prompt with a small limit shares a block with a short prompt and a large limit:
    the long row must not run past the model's 128 learned positions while the other decodes."""
    from tiny_models import random_prompts

    long_prompt, short_prompt = random_prompts([120, 10], seed=5)
    with make_llm(opt_dir, gpu_batch_size=2) as opt:
        lines = [{"id": "long", "input_ids": long_prompt, "max_new_tokens": 4},
                 {"id": "short", "input_ids": short_prompt, "max_new_tokens": 100}]
        got = generate(opt, job(tmp_path, lines, opt), ignore_eos=True)
        alone_long = opt.generate([long_prompt], max_new_tokens=4, ignore_eos=True).outputs[0]
        alone_short = opt.generate([short_prompt], max_new_tokens=100, ignore_eos=True).outputs[0]
    assert list(got["long"].output_ids) == alone_long.output_ids
    assert list(got["short"].output_ids) == alone_short.output_ids


def test_stop_ids_and_stop_strings_per_request(llm, tmp_path):
    full = llm.generate(PROMPTS[:3], max_new_tokens=16, ignore_eos=True).outputs
    stop_id = full[0].output_ids[3]
    text = full[1].text
    start = next(i for i in range(2, len(text) - 3) if text[i].isalpha() and text[i + 2].isalpha())
    stop = text[start:start + 3]  # a stop string that need not start on a token boundary
    first = text.find(stop)
    lines = [{"id": 0, "prompt": PROMPTS[0], "stop_token_ids": [stop_id]},
             {"id": 1, "prompt": PROMPTS[1], "stop": [stop, "never in the output"]},
             {"id": 2, "prompt": PROMPTS[2]}]
    got = generate(llm, job(tmp_path, lines, llm), ignore_eos=True)
    cut = full[0].output_ids.index(stop_id) + 1
    assert list(got[0].output_ids) == full[0].output_ids[:cut] and got[0].finish_reason == "stop"
    ids = list(got[1].output_ids)
    assert got[1].finish_reason == "stop" and got[1].text == text[:first]
    assert ids == full[1].output_ids[:len(ids)]
    assert stop in llm.decode(ids) and stop not in llm.decode(ids[:-1])  # ends at the completing token
    assert list(got[2].output_ids) == full[2].output_ids and got[2].finish_reason == "length"


def test_stop_strings_decode_a_window_not_the_whole_output(llm):
    text = "Return the number of bytes: café naïve 漢字 🙂, then stop here and more text after it."
    ids = llm.tokenizer(text)["input_ids"]
    widths = []

    def decode(window):
        widths.append(len(window))
        return llm.decode(window)

    pieces = IncrementalText(decode)
    assert "".join(pieces.push(t) for t in ids) == llm.decode(ids)
    assert max(widths) <= 8, widths  # a few tokens each step, however long the text grows
    matcher = StopStringMatcher(["stop here"], llm.decode)
    hits = [matcher.push(t) for t in ids]
    assert hits.index(True) == next(n for n in range(len(ids)) if "stop here" in llm.decode(ids[:n + 1]))
    assert trim_at_stop("abc STOP def stop", ["stop", "STOP"]) == "abc "


def test_sampled_results_do_not_depend_on_block_batch_or_other_prompts(tmp_path):
    lines = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    lines[1]["temperature"] = 0.9  # sampled rows and greedy rows share blocks
    lines[2]["temperature"] = 0.7
    lines[2]["seed"] = 123
    lines[4]["temperature"] = 1.0
    lines[4]["top_k"] = 50
    with make_llm(gpu_batch_size=4) as first:
        whole = generate(first, job(tmp_path, lines, first), do_sample=True, temperature=0.8, seed=5)
        again = generate(first, job(tmp_path, lines, first), do_sample=True, temperature=0.8, seed=6)
    with make_llm(gpu_batch_size=3, num_gpu_batches=2) as other:
        shard = generate(other, job(tmp_path, lines, other, shard=Shard(index=1, count=2)),
                         do_sample=True, temperature=0.8, seed=5)
    assert set(shard) == {"r1", "r3", "r5"}
    for key, completion in shard.items():
        assert list(completion.output_ids) == list(whole[key].output_ids), key
    # the run's seed matters for rows without their own seed, not for a row with one
    assert any(list(whole[k].output_ids) != list(again[k].output_ids) for k in ("r0", "r1", "r3", "r4", "r5"))
    assert list(whole["r2"].output_ids) == list(again["r2"].output_ids)
