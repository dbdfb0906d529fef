"""The benchmark end to end: rank scaling, comparing systems with each run's bound and the in-memory
ratio, and the throughput-latency sweep (numbers not asserted: speed is a benchmark's business,
not a test's; what is asserted is that they are there, consistent, and in range)."""

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

from flexgen_dist.bench.sweep import CSV_COLUMNS
from flexgen_dist.errors import UserError
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


def _plant_link(folder, name):
    (folder / "victim.txt").write_text("precious\n")
    (folder / name).symlink_to(folder / "victim.txt")


@pytest.mark.parametrize("args, setup, fragment", [
    (["--model", "M", "--shape", "opt-125m"], None, "give --model or --shape, not both"),
    (["--prompt-len", -1, "--systems", "ours", "--blocks", "1x1"], None, "--prompt-len must be >= 1, got -1"),
    (["--gen-len", 0, "--systems", "ours", "--blocks", "1x1"], None, "--gen-len must be >= 1, got 0"),
    (["--ranks", 1, "--cores", 0], None, "--cores must be >= 1, got 0"),
    (["--ranks", 1, "--gpu-batch-size", 0], None, "--gpu-batch-size must be >= 1, got 0"),
    (["--budget", "0"], None, "--budget must be a positive size"),
    (["--json", "no/such/r.json"], None, "cannot write --json 'no/such/r.json': folder"),
    (["--json", "r.json"], lambda d: _plant_link(d, "r.json"), "--json 'r.json' is a symbolic link"),
    (["--sweep", "--placements", "moon"], None, "--placements"),
    (["--offload-dir", "f"], lambda d: (d / "f").write_text("precious\n"), "--offload-dir f is not a folder"),
])
def test_bench_flags_are_checked_before_any_folder_or_run(tmp_path, monkeypatch, capsys, args, setup, fragment):
    from flexgen_dist.bench import __main__ as bench

    work, temp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir(), temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where a default offload folder would appear
    if setup is not None:
        setup(work)
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in work.iterdir()}

    def ran(*a, **k):
        raise AssertionError("the bench started before its flags were checked")

    monkeypatch.setattr(bench, "_command", ran)
    code = bench.main([str(work if a == "M" else a) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [err.strip()] and err.startswith("error: ") and fragment in err, err
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in work.iterdir()} == before
    assert list(temp.iterdir()) == []


def test_the_default_offload_folder_is_removed_when_the_bench_ends(tmp_path, monkeypatch):
    from flexgen_dist.bench import __main__ as bench

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    def fails(args, offload):
        seen.append(offload)
        (offload / "checkpoint").write_text("random weights")
        raise UserError("a run of ours was refused")

    monkeypatch.setattr(bench, "_command", fails)
    assert bench.main(["--systems", "ours", "--blocks", "1x1"]) == 2
    assert seen and seen[0].parent == tmp_path and list(tmp_path.iterdir()) == []


BOUND_LINE = re.compile(r"^(ours|ours-in-memory) (\d+x\d+): prefill [\d.]+, decode [\d.]+, total [\d.]+ tok/s; "
                        r"decode bound ([\d.]+) tok/s \((compute|load)-bound\) = ([\d.e+-]+) of the bound", re.M)


def _total(line: str) -> float:
    return float(re.search(r"total ([\d.]+) tok/s", line).group(1))


def _bench(args, tmp_path, extra_env=None, timeout=300):
    # The bound's hardware profile is measured (quick) into the test's own cache, not the user's.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "FLEXGEN_CACHE_DIR": str(tmp_path / "cache"),
           **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "flexgen_dist.bench", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_compare_prints_each_attempt_with_its_bound_and_the_in_memory_ratio(tiny_models_cache, tmp_path):
    model = tiny_models_cache.get("llama", num_hidden_layers=4)
    out = tmp_path / "compare.json"
    # A 1200 KiB budget (600 KiB a tier) cannot hold the weights on the gpu tier: ours offloads.
    proc = _bench(["--model", str(model), "--prompt-len", "8", "--gen-len", "3", "--systems", "ours,transformers",
                   "--batches", "2", "--blocks", "2x1,2x2", "--budget", "1200K", "--offload-dir", str(tmp_path / "off"),
                   "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {(m.group(1), m.group(2)): m for m in BOUND_LINE.finditer(proc.stderr)}
    best = max((m for (system, _), m in lines.items() if system == "ours"), key=lambda m: _total(m.group(0)))
    assert set(lines) == {("ours", "2x1"), ("ours", "2x2"), ("ours-in-memory", best.group(2))}, proc.stderr
    for m in lines.values():
        assert float(m.group(3)) > 0
        assert 0 < float(m.group(5)) < 10
    # Each attempt's line is printed when it finishes: ours' before the next system starts.
    assert proc.stderr.index("ours 2x2:") < proc.stderr.index("transformers: batches")
    assert re.search(r"^transformers 2: prefill [\d.]+, decode [\d.]+", proc.stderr, re.M)

    ratio = re.search(r"^offloaded decode / in-memory decode = ([\d.]+) \(block " + best.group(2), proc.stdout, re.M)
    assert ratio and float(ratio.group(1)) > 0, proc.stdout
    assert str(tmp_path / "cache") in proc.stdout  # which profile the bounds came from
    table = proc.stdout.splitlines()
    header = next(line for line in table if line.startswith("system"))
    assert "decode bound" in header and "of bound" in header
    rows = {line.split()[0]: line for line in table if line.split() and line.split()[0] in ("ours", "transformers", "ours-in-memory")}
    assert set(rows) == {"ours", "transformers", "ours-in-memory"}
    assert "1.00x" in rows["ours"]  # the baseline of the ratios is ours, measured in the same run

    data = json.loads(out.read_text())
    assert [a["batch"] for a in data["ours"]] == [2, 4]
    assert all(a["ok"] for a in data["ours"] + data["transformers"] + data["ours-in-memory"])
    offloaded = next(a for a in data["ours"] if a["label"] == best.group(2))["result"]["policy_fields"]
    in_memory = data["ours-in-memory"][0]["result"]["policy_fields"]
    assert offloaded["w_gpu_percent"] < 100
    assert (in_memory["w_gpu_percent"], in_memory["cache_gpu_percent"], in_memory["act_gpu_percent"]) == (100, 100, 100)
    assert f'{in_memory["gpu_batch_size"]}x{in_memory["num_gpu_batches"]}' == best.group(2)  # the best block again
    assert data["ours"][-1]["bound"]["decode_tokens_per_s"] > 0


def test_ours_flags_reach_every_run_of_ours_and_bad_ones_stop_before_any_work(tiny_models_cache, tmp_path):
    model = tiny_models_cache.get("llama", num_hidden_layers=2)
    out = tmp_path / "compare.json"
    proc = _bench(["--model", str(model), "--prompt-len", "8", "--gen-len", "2", "--systems", "ours", "--blocks", "2x1",
                   "--ours-flags=--compress-weight --compress-cache", "--offload-dir", str(tmp_path / "off"),
                   "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    for system in ("ours", "ours-in-memory"):
        fields = data[system][0]["result"]["policy_fields"]
        assert fields["compress_weight"] and fields["compress_cache"], (system, fields)

    for flags, said in (("--compress-bits x", "invalid int value"), ("--no-such-flag", "has no --no-such-flag"),
                        ("--offload-dir /elsewhere", "set by the bench itself")):
        proc = _bench(["--shape", "opt-125m", "--systems", "ours", f"--ours-flags={flags}",
                       "--offload-dir", str(tmp_path / "bad")], tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("error: --ours-flags") and said in proc.stderr, proc.stderr
        assert not (tmp_path / "bad").exists()  # refused before the checkpoint is written


def test_sweep_writes_a_csv_and_a_chart(tmp_path):
    csv_path, png = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    args = ["--sweep", "--shape", "tiny-opt", "--prompt-len", "8", "--gen-len", "3", "--systems", "ours,transformers",
            "--batches", "2", "--blocks", "2x1,2x2", "--placements", "gpu,disk", "--offload-dir", str(tmp_path / "off"),
            "--sweep-csv", str(csv_path)]
    proc = _bench(args + (["--sweep-png", str(png)] if has_matplotlib else []), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with csv_path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert [(r["system"], r["run"]) for r in rows] == [
        ("ours", "2x1 gpu"), ("ours", "2x2 gpu"), ("ours", "2x1 disk"), ("ours", "2x2 disk"), ("transformers", "2")]
    for r in rows:
        assert r["error"] == ""
        # one block per run: its throughput times its latency is the block's generated tokens
        assert float(r["total_tokens_per_s"]) * float(r["block_latency_s"]) == pytest.approx(int(r["batch"]) * 3, rel=1e-6)
        assert int(r["peak_mem_bytes"]) > 0
    for r in rows[:4]:
        assert 0 < float(r["of_bound"]) < 10
    assert "w 0/0/100" in rows[2]["policy"] and "w 100/0/0" in rows[0]["policy"]
    assert re.search(r"^\* ours ", proc.stdout, re.M)  # the frontier is marked in the table
    if has_matplotlib:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"chart: {png}" in proc.stdout


def test_sweep_png_without_matplotlib_is_one_line_before_any_run(tmp_path):
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    path = os.pathsep.join([str(tmp_path / "shim"), os.environ.get("PYTHONPATH", "")])
    proc = _bench(["--sweep", "--shape", "tiny-opt", "--sweep-png", str(tmp_path / "s.png"), "--offload-dir",
                   str(tmp_path / "off")], tmp_path, extra_env={"PYTHONPATH": path})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --sweep-png needs matplotlib: pip install 'flexgen_dist[plot]'"]
    assert not (tmp_path / "off").exists()  # nothing was run
