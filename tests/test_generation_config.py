"""A checkpoint's generation_config.json and a tied head that the checkpoint stores on its own,
each against what transformers 5 does with the same folder (its `generate` with no arguments
reads generation_config.json itself; `from_pretrained` decides the tying)."""

import json
import shutil

import pytest
import torch

from flexgen_dist import LLM

FAST = ["--no-warmup", "--quiet", "--gpu-batch-size", "2", "--device", "cpu"]
NEW_TOKENS = 10



def hf_generate(model_dir, prompt, max_new_tokens=NEW_TOKENS):
    """transformers' greedy generate as a user calls it: its stop ids from the folder's files."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def copy_model(src, dst, *, config=None, generation=None):
    shutil.copytree(src, dst)
    if config:
        data = json.loads((dst / "config.json").read_text())
        data.update(config)
        (dst / "config.json").write_text(json.dumps(data))
    if generation is not None:
        (dst / "generation_config.json").write_text(generation if isinstance(generation, str) else json.dumps(generation))
    return dst


@pytest.fixture(scope="module")
def eos_case(llama_dir, unambiguous_prompts, tmp_path_factory):
    """A copy of the tiny llama whose generation_config.json lists a token the greedy
    continuation of the prompts emits (config.json's EOS, 2, it never emits), and the prompts."""
    prompts = unambiguous_prompts(llama_dir, [5, 7, 9], NEW_TOKENS, seed=3)
    first = hf_generate(llama_dir, prompts[0])
    stop_token = first[3]  # found by running transformers first: step 3 of the first prompt
    assert 2 not in first
    model = copy_model(llama_dir, tmp_path_factory.mktemp("eos") / "model",
                       generation={"bos_token_id": 1, "eos_token_id": [2, stop_token], "pad_token_id": 0})
    return model, prompts, stop_token


def test_the_generation_configs_eos_list_stops_as_transformers_does(eos_case):
    model, prompts, stop_token = eos_case
    want = [hf_generate(model, p) for p in prompts]
    assert want[0][-1] == stop_token and len(want[0]) == 4  # the reference stops there
    llm = LLM(model)
    try:
        got = llm.generate(prompts, max_new_tokens=NEW_TOKENS).outputs
    finally:
        llm.close()
    assert [o.output_ids for o in got] == want
    assert [o.finish_reason for o in got] == ["stop" if w[-1] == stop_token else "length" for w in want]


def test_the_run_command_stops_at_it_and_says_where_the_eos_ids_came_from(cli, eos_case, tmp_path):
    model, prompts, stop_token = eos_case
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "input_ids": p}) + "\n" for i, p in enumerate(prompts)))
    code, out, err = cli("--model", model, "--input", src, "--output", tmp_path / "out.jsonl",
                         "--max-new-tokens", NEW_TOKENS, *FAST)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["output_ids"] for r in rows] == [hf_generate(model, p) for p in prompts]
    assert rows[0]["finish_reason"] == "stop"
    assert f"EOS ids 2, {stop_token} (from generation_config.json)" in out


def test_without_a_generation_config_the_configs_eos_holds(llama_dir, tmp_path, unambiguous_prompts):
    prompts = unambiguous_prompts(llama_dir, [6], NEW_TOKENS, seed=3)
    token = hf_generate(llama_dir, prompts[0])[2]
    model = copy_model(llama_dir, tmp_path / "m", config={"eos_token_id": token})
    (model / "generation_config.json").unlink()
    want = hf_generate(model, prompts[0])
    assert want[-1] == token
    llm = LLM(model)
    try:
        assert llm.generate(prompts, max_new_tokens=NEW_TOKENS).outputs[0].output_ids == want
    finally:
        llm.close()


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "is not valid JSON (line 1, column 2"),
    ("[1, 2]", "holds [1, 2] (a list), expected a JSON object"),
    ({"eos_token_id": "2"}, "'eos_token_id' is \"2\" (a string)"),
    ({"eos_token_id": [2, 1.5]}, "'eos_token_id' is [2, 1.5]"),
    ({"eos_token_id": [2, 100000]}, "eos_token_id 100000 is outside the model's vocabulary"),
    ({"temperature": "hot"}, "'temperature' is \"hot\" (a string), expected a finite number >= 0"),
    ({"do_sample": "yes"}, "'do_sample' is \"yes\" (a string), expected true or false"),
    ({"top_p": 2}, "'top_p' is 2 (an integer), expected a number in (0, 1]"),
    ({"top_k": -1}, "'top_k' is -1 (an integer)"),
    ({"do_sample": True, "temperature": 0}, "do_sample is true with temperature 0"),
])
def test_a_damaged_generation_config_is_one_line_naming_it(cli, llama_dir, tmp_path, content, fragment):
    model = copy_model(llama_dir, tmp_path / "m", generation=content)
    code, out, err = cli("--model", model, "--prompt-len", 4, "--num-prompts", 2, "--max-new-tokens", 2, *FAST)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "generation_config.json" in lines[0] and fragment in lines[0], lines[0]


def test_its_sampling_defaults_apply_where_no_flag_is_given_and_are_said(cli, llama_dir, tmp_path):
    model = copy_model(llama_dir, tmp_path / "m", generation={"eos_token_id": 2, "do_sample": True,
                                                             "temperature": 0.7, "top_k": 20})
    args = ["--model", model, "--prompt-len", 4, "--num-prompts", 2, "--max-new-tokens", 2, "--output",
            tmp_path / "o.jsonl", *FAST]
    code, out, err = cli(*args)
    assert code == 0, err
    assert "generation: sampling (temperature 0.7, top-k 20, top-p 1" in out
    assert "from generation_config.json: do_sample, temperature, top_k" in out
    code, out, err = cli(*args[:-len(FAST)], "--no-do-sample", "--overwrite", *FAST)
    assert code == 0, err
    assert "generation: greedy;" in out and "from generation_config.json:" not in out  # the flag wins
    code, out, err = cli(*args[:-len(FAST)], "--temperature", "0.5", "--overwrite", *FAST)
    assert code == 0, err
    assert "temperature 0.5" in out and "from generation_config.json: do_sample, top_k" in out


def test_a_tied_head_stored_on_its_own_is_used_as_transformers_5_does(llama_dir, tmp_path, unambiguous_prompts):
    """config.json says tie_word_embeddings but the checkpoint has a distinct lm_head.weight:
    transformers 5 keeps the stored head (it ties only equal tensors), so the logits are those of
    the untied model; tying silently would give other tokens."""
    from transformers import AutoModelForCausalLM

    model = copy_model(llama_dir, tmp_path / "m", config={"tie_word_embeddings": True})
    prompts = unambiguous_prompts(llama_dir, [5, 8], NEW_TOKENS, seed=4)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        tied_hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()(ids).logits
        untied_hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()(ids).logits
    assert torch.equal(tied_hf, untied_hf)  # what transformers 5 does with this folder
    llm = LLM(model)
    try:
        got = [o.output_ids for o in llm.generate(prompts, max_new_tokens=NEW_TOKENS).outputs]
    finally:
        llm.close()
    assert got == [hf_generate(llama_dir, p) for p in prompts]
