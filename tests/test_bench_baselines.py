"""The benchmark's baselines and memory caps: size parsing, capped child processes, random
checkpoints, and one run of each baseline child on the tiny-opt shape."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from flexgen_dist.bench import baselines, memlimit
from flexgen_dist.bench.checkpoints import SHAPES, make_random_checkpoint
from flexgen_dist.bench.runs import Attempt, baseline_command, best_batch, run_baseline
from flexgen_dist.bench.memlimit import cgroup_support, evict_from_page_cache, parse_size, run_limited
from flexgen_dist.errors import UserError

MiB = 1024**2

# Touches every page of 300 MiB, so the memory is really resident (not only reserved).
ALLOCATE_300M = "b = bytearray(300 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); print('allocated', flush=True)"
# The peak is polled: the child keeps its memory until the file named by its first argument
# exists, which `release_when_polled` creates once the parent's poll has seen the memory. Exit 3:
# never released (the poll never saw it).
HOLD_UNTIL_RELEASED = """
import os, sys, time
{allocate}
deadline = time.monotonic() + 120
while not os.path.exists(sys.argv[1]):
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.005)
"""


@pytest.fixture
def release_when_polled(monkeypatch, tmp_path):
    """(command, release file) for a child that allocates `allocate` (code) and holds it until
    run_limited's poll has read a peak of at least `threshold` bytes from /proc."""
    release = tmp_path / "release"
    real = memlimit._vm_hwm

    def watching(pid):
        hwm = real(pid)
        if hwm is not None and hwm >= watching.threshold:
            release.touch()
        return hwm

    monkeypatch.setattr(memlimit, "_vm_hwm", watching)

    def command(allocate: str, threshold: int) -> list[str]:
        watching.threshold = threshold
        return [sys.executable, "-c", HOLD_UNTIL_RELEASED.format(allocate=allocate), str(release)]

    return command


# ---------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4G", 4 * 1024**3),
        ("4g", 4 * 1024**3),
        ("4GiB", 4 * 1024**3),
        ("4GB", 4 * 1000**3),
        ("512M", 512 * MiB),
        ("512 MiB", 512 * MiB),
        ("100K", 100 * 1024),
        ("1T", 1024**4),
        ("1.5G", 3 * 1024**3 // 2),
        ("1048576", 1048576),
        ("0", 0),
        (123, 123),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "four", "4X", "4GG", "-1G", "1.5", "4 G B", -5])
def test_parse_size_refuses_bad_text(text):
    with pytest.raises(UserError) as info:
        parse_size(text)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- run_limited


def test_run_limited_without_cap_measures_peak_rss(release_when_polled):
    run = run_limited(release_when_polled(ALLOCATE_300M, 300 * MiB), mem_limit=None, timeout_s=300)
    assert run.returncode == 0 and run.ok and not run.oom_killed
    assert run.stdout.strip() == "allocated"
    assert run.limit_method == "none"
    assert 300 * MiB <= run.peak_rss_bytes < 600 * MiB


def test_run_limited_peak_is_the_childs_own_not_the_parents(release_when_polled):
    # Linux carries a parent's RSS high-water mark into its children's ru_maxrss: a large
    # parent must not make a small child look large.
    ballast = bytearray(400 * MiB)
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    run = run_limited(release_when_polled("", 1), mem_limit=None, timeout_s=300)  # held until polled once
    assert run.ok
    assert run.peak_rss_bytes is not None and run.peak_rss_bytes < 200 * MiB
    del ballast


def test_run_limited_cap_kills_an_allocation_over_it():
    method = cgroup_support()
    run = run_limited([sys.executable, "-c", ALLOCATE_300M], mem_limit=200 * MiB, timeout_s=60)
    if method == "rlimit-as":
        assert run.limit_method.startswith("rlimit-as")
        if run.ok or not run.oom_killed:
            pytest.skip(f"no memory cgroup here and RLIMIT_AS did not stop the child: {run.describe_failure()}")
    else:
        assert run.limit_method.startswith(method)
        assert run.peak_cgroup_bytes is not None and run.peak_cgroup_bytes <= 200 * MiB
        assert not os.path.exists(run.limit_method.split(" ", 1)[1])  # the group is removed
    assert run.oom_killed and not run.ok
    assert "allocated" not in run.stdout
    assert "out of memory" in run.describe_failure()


def test_run_limited_cap_lets_a_fitting_run_through(release_when_polled):
    run = run_limited(release_when_polled(ALLOCATE_300M, 300 * MiB), mem_limit=1024 * MiB, timeout_s=300)
    assert run.ok and run.stdout.strip() == "allocated"
    assert run.peak_rss_bytes >= 300 * MiB
    if run.peak_cgroup_bytes is not None:  # a cgroup charges the child's memory: at least what it touched, at most the cap
        assert 300 * MiB <= run.peak_cgroup_bytes <= 1024 * MiB


def test_run_limited_rlimit_fallback_fails_allocation():
    run = run_limited([sys.executable, "-c", ALLOCATE_300M], mem_limit=200 * MiB, method="rlimit", timeout_s=60)
    assert run.limit_method.startswith("rlimit-as (weaker")
    assert run.returncode != 0 and run.oom_killed  # a MemoryError, not a kill


def test_run_limited_refuses_unknown_method():
    with pytest.raises(UserError):
        run_limited(["true"], mem_limit=None, method="magic")


def test_run_limited_timeout_kills_the_child():
    # Without the kill the child would print 'slept' after 30 s and exit 0.
    run = run_limited([sys.executable, "-c", "import time; time.sleep(30); print('slept')"], mem_limit=None,
                      timeout_s=0.5)
    assert run.timed_out and not run.ok and not run.oom_killed
    assert run.returncode == -signal.SIGKILL and "slept" not in run.stdout
    assert run.wall_s >= 0.5  # not killed before its time
    assert run.describe_failure() == f"timed out after {run.wall_s:.0f} s"


def test_evict_from_page_cache_covers_files_and_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a" * 1000)
    (tmp_path / "sub" / "b.bin").write_bytes(b"b" * 500)
    assert evict_from_page_cache([tmp_path]) == 1500
    assert evict_from_page_cache(tmp_path / "a.bin") == 1000
    assert evict_from_page_cache([tmp_path / "missing"]) == 0


# ---------------------------------------------------------------- checkpoints and batches


@pytest.fixture(scope="module")
def tiny_opt_dir(tmp_path_factory):
    return make_random_checkpoint("tiny-opt", tmp_path_factory.mktemp("bench") / "tiny-opt", seed=0)


def test_make_random_checkpoint_writes_and_reuses(tiny_opt_dir):
    config = json.loads((tiny_opt_dir / "config.json").read_text())
    assert config["model_type"] == "opt"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    weights = tiny_opt_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert make_random_checkpoint("tiny-opt", tiny_opt_dir, seed=0) == tiny_opt_dir
    assert weights.stat().st_mtime_ns == before  # reused, not rewritten


def test_make_random_checkpoint_is_seeded_and_refuses_foreign_folders(tmp_path, tiny_opt_dir):
    from safetensors.torch import load_file

    again = make_random_checkpoint("tiny-opt", tmp_path / "again", seed=0)
    first, second = load_file(tiny_opt_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError):
        make_random_checkpoint("tiny-opt", tmp_path / "mine")
    with pytest.raises(UserError):
        make_random_checkpoint("opt-9000b", tmp_path / "x")


def test_real_opt_shapes():
    for name, hidden, layers, heads in [("opt-125m", 768, 12, 12), ("opt-1.3b", 2048, 24, 32), ("opt-6.7b", 4096, 32, 32)]:
        shape = SHAPES[name]
        assert (shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"]) == (hidden, layers, heads)
        assert shape["ffn_dim"] == 4 * hidden and shape["vocab_size"] == 50272
        assert shape["max_position_embeddings"] == 2048


def test_best_batch_keeps_the_best_until_a_failure():
    throughput = {1: 5.0, 2: 9.0, 4: 8.0, 8: None, 16: 100.0}
    tried = []

    def run_fn(batch):
        tried.append(batch)
        if throughput[batch] is None:
            return Attempt(system="fake", batch=batch, ok=False, oom_killed=True, error="out of memory")
        return Attempt(system="fake", batch=batch, ok=True, result={"total_tokens_per_s": throughput[batch]})

    best, attempts = best_batch(run_fn, [16, 4, 1, 8, 2])
    assert tried == [1, 2, 4, 8]  # increasing, and nothing after the failure
    assert best.batch == 2 and [a.ok for a in attempts] == [True, True, True, False]

    def raising(batch):
        raise RuntimeError("boom")

    best, attempts = best_batch(raising, [1, 2])
    assert best is None and len(attempts) == 1 and "boom" in attempts[0].error


# ---------------------------------------------------------------- the baseline children


def _check_record(record, system):
    assert record["system"] == system
    assert (record["batch"], record["prompt_len"], record["gen_len"]) == (2, 8, 4)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "total_tokens_per_s", "total_s", "prefill_s"):
        assert record[key] > 0, key
    assert record["total_tokens_per_s"] == pytest.approx(2 * 4 / record["total_s"])
    assert record["forward_calls"] == 4
    assert record["num_layers"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_transformers_child_prints_one_json_line(tiny_opt_dir, dtype):
    cmd = baseline_command("transformers", tiny_opt_dir, 2, 8, 4, dtype=dtype)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    record = json.loads(lines[0])
    _check_record(record, "transformers")
    assert record["disk_layers"] == 0 and record["layers_by_tier"] == {"cpu": 2}
    # the dtype of the model's parameters: the fp16 checkpoint converted to what was asked (fp32 by default on a CPU)
    assert record["dtype"] == (dtype or "float32")


@pytest.mark.slow
def test_accelerate_child_offloads_layers_to_disk_and_fewer_in_16_bits(tiny_opt_dir, tmp_path):
    # 600 KB holds the embeddings in fp32 (256 KiB + 128 KiB) but not them plus a layer and the
    # buffer Accelerate keeps for loading offloaded layers; in bfloat16 everything is half as big.
    records = {}
    for dtype in ("float32", "bfloat16"):
        attempt = run_baseline(
            "accelerate", tiny_opt_dir, 2, 8, 4, max_memory="600KB", offload_folder=tmp_path / f"offload-{dtype}",
            dtype=dtype, mem_limit=2 * 1024**3, evict=[tiny_opt_dir], timeout_s=300,
        )
        assert attempt.ok, attempt.error + "\n" + attempt.stderr_tail
        assert attempt.dtype == attempt.result["dtype"] == dtype
        _check_record(attempt.result, "accelerate")
        assert sum(attempt.result["layers_by_tier"].values()) == 2
        assert attempt.peak_rss_bytes > 0 and not attempt.oom_killed
        records[dtype] = attempt.result
    assert records["float32"]["disk_layers"] > 0
    assert "disk of 2 layers" in records["float32"]["notes"]
    assert records["bfloat16"]["disk_layers"] < records["float32"]["disk_layers"]


def test_baseline_command_passes_the_dtype():
    cmd = baseline_command("accelerate", "M", 4, 8, 2, max_memory="1G", dtype="bfloat16")
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert "--dtype" not in baseline_command("transformers", "M", 4, 8, 2)  # the child's default


def test_layer_tiers_reads_accelerate_maps():
    import torch

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(4, 2)
            self.layers = torch.nn.ModuleList(Layer() for _ in range(4))

    model = Model()
    assert baselines.layer_tiers(model) == {"cpu": 4}  # no map: where the parameters are
    model.hf_device_map = {"embed": "cpu", "layers.0": "cpu", "layers.1.a": "cpu", "layers.1.b": "disk", "layers.2": "disk", "layers.3": 0}
    assert baselines.layer_tiers(model) == {"cpu": 1, "mixed": 1, "disk": 1, "0": 1}
    model.hf_device_map = {"": "disk"}
    assert baselines.layer_tiers(model) == {"disk": 4}
    model.hf_device_map = {"embed": "cpu", "layers": "disk"}
    assert baselines.layer_tiers(model) == {"disk": 4}
