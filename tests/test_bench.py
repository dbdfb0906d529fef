"""The scaling benchmark runs end to end and prints a row per rank count (numbers not asserted:
speed is a benchmark's business, not a test's)."""

import json
import os
import subprocess
import sys

import pytest

from tiny_models import make_tiny_model

pytestmark = pytest.mark.dist


def test_ranks_table_and_json(tmp_path):
    model = make_tiny_model("llama", tmp_path / "llama", num_hidden_layers=4)
    out = tmp_path / "scaling.json"
    proc = subprocess.run(
        [sys.executable, "-m", "flexgen_dist.bench", "--ranks", "1,2", "--model", str(model), "--prompt-len", "8",
         "--gen-len", "4", "--gpu-batch-size", "2", "--gpu-mem", "600K", "--cpu-mem", "0", "--offload-dir",
         str(tmp_path / "off"), "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["ranks"] for r in rows] == [1, 2]
    assert all(r["decode_tokens_per_s"] > 0 for r in rows)
    # 600 KiB cannot hold the 756 KiB of fp32 weights of one rank, so some went to disk at 1 rank; none at 2
    disk = [100 - r["policy"]["w_gpu_percent"] - r["policy"]["w_cpu_percent"] for r in rows]
    assert disk[0] > disk[1]
    assert "decode vs 1 rank" in proc.stdout


def test_bad_ranks_is_a_user_error():
    proc = subprocess.run([sys.executable, "-m", "flexgen_dist.bench", "--ranks", "one"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --ranks")


def test_compare_systems_prints_a_row_each_with_ratios(tmp_path):
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [sys.executable, "-m", "flexgen_dist.bench", "--shape", "tiny-opt", "--prompt-len", "8", "--gen-len", "3",
         "--systems", "ours,transformers", "--batches", "2", "--blocks", "2x1,2x2", "--offload-dir",
         str(tmp_path / "off"), "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.splitlines()
    rows = {line.split()[0]: line for line in table if line.split() and line.split()[0] in ("ours", "transformers")}
    assert set(rows) == {"ours", "transformers"}
    assert "1.00x" in rows["ours"]  # the baseline of the ratios is ours, measured in the same run
    data = json.loads(out.read_text())
    assert [a["batch"] for a in data["ours"]] == [2, 4]
    assert all(a["ok"] for a in data["ours"] + data["transformers"])
