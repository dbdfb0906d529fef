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
