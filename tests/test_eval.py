"""Perplexity through our engine agrees with transformers on the bundled model and text."""

import math
import subprocess
import sys

import pytest
import torch

from flexgen_dist import DEFAULT_MODEL
from flexgen_dist.eval import DEFAULT_TEXT, windows

MAX_TOKENS = 3000  # enough windows to be a real check, quick on two cores
WINDOW = 256


@pytest.fixture(scope="module")
def hf_perplexity():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    text = open(DEFAULT_TEXT, encoding="utf-8").read()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows(ids, WINDOW, MAX_TOKENS):
            logits = model(torch.tensor([w])).logits[0].float()
            logp = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(w[1:])[:, None])
            nll -= logp.sum().item()
            count += len(w) - 1
    return math.exp(nll / count)


def run_eval(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "flexgen_dist.eval", "--window", str(WINDOW), "--max-tokens", str(MAX_TOKENS),
         "--device", "cpu", *args],  # fp32 on the CPU, as the reference
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("perplexity: ")
    return float(last.split()[-1])


@pytest.mark.parametrize("policy", [[], ["--percent", "0", "50", "50", "50", "100", "0", "--num-gpu-batches", "2"]],
                         ids=["in memory", "weights half on disk"])
def test_eval_agrees_with_transformers(hf_perplexity, policy, tmp_path):
    ours = run_eval(*policy, "--offload-dir", str(tmp_path))
    assert ours == pytest.approx(hf_perplexity, rel=0.005)


def test_missing_text_is_a_user_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flexgen_dist.eval", "--text", str(tmp_path / "none.txt")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.fixture(scope="module")
def tokenizer_llama(tmp_path_factory):
    from tiny_models import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("eval") / "llama", tokenizer=True)


@pytest.fixture
def eval_cli(capsys, monkeypatch):
    import logging

    from flexgen_dist import eval as eval_module

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(eval_module, "LLM", never)

    def call(*args):
        code = eval_module.main([str(a) for a in args])
        return code, capsys.readouterr().err

    yield call
    root = logging.getLogger()  # the command installs a handler on the captured stderr: drop it
    for handler in list(root.handlers):
        if getattr(handler, "_flexgen_dist", False):
            root.removeHandler(handler)


@pytest.mark.parametrize("content, args, fragment", [
    (None, ["--max-tokens", 0], "--max-tokens must be at least 2 (a scored token needs one before it), got 0"),
    (None, ["--max-tokens", -5], "--max-tokens must be at least 2"),
    (None, ["--max-tokens", 1], "--max-tokens must be at least 2"),
    (b"caf\xe9 au lait " * 20, [], "is not UTF-8 text (byte 0xe9 at offset 3 cannot be decoded)"),
    (b"", [], "is 0 tokens long; scoring needs at least 2"),
    (b"x", [], "is 1 token long; scoring needs at least 2"),
    ("folder", [], "is a folder; give a regular text file"),
])
def test_a_text_or_limit_that_cannot_be_scored_is_one_line_before_the_model_loads(eval_cli, tokenizer_llama, tmp_path,
                                                                                content, args, fragment):
    text = tmp_path / "t.txt"
    if content == "folder":
        text.mkdir()
    elif content is not None:
        text.write_bytes(content)
    code, err = eval_cli("--model", tokenizer_llama, *(["--text", text] if content is not None else []), *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    if content is not None:
        assert "t.txt" in lines[0]  # names the file
