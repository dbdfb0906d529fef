"""The benchmark end to end: rank scaling, comparing systems in several compute dtypes with each
run's bound and the in-memory ratio, and the throughput-latency sweep. Speeds are not asserted
(a benchmark's business, not a test's); what is: every system ran in the dtypes asked for, each
bound is the one computed here for that run's policy and dtype on a machine of known speeds, and
the ratios, marks and bests printed are those of the numbers in the JSON."""

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
    # The table: each row's placement and decode from the JSON, its ratio that decode over 1 rank's
    assert "decode vs 1 rank" in proc.stdout
    table = re.findall(r"^ +(\d+) +(\d+)/(\d+)/(\d+) +([\d.]+) +([\d.]+) +([\d.]+)x +([\d.]+)x$", proc.stdout, re.M)
    assert [int(t[0]) for t in table] == [1, 2], proc.stdout
    for (ranks, w_gpu, w_cpu, w_disk, decode, total, ratio, per_rank), r in zip(table, rows):
        p = r["policy"]
        assert (int(w_gpu), int(w_cpu), int(w_disk)) == (round(p["w_gpu_percent"]), round(p["w_cpu_percent"]),
                                                          round(100 - p["w_gpu_percent"] - p["w_cpu_percent"]))
        assert (float(decode), float(total)) == (pytest.approx(r["decode_tokens_per_s"], abs=0.006),
                                                 pytest.approx(r["tokens_per_s"], abs=0.006))
        expected = r["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
        assert float(ratio) == pytest.approx(expected, abs=0.006)
        assert float(per_rank) == pytest.approx(expected / int(ranks), abs=0.006)


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
    (["--baseline-dtypes", "float8"], None, "--baseline-dtypes 'float8': use measured or a comma-separated list"),
    (["--ours-dtypes", "measured,float32"], None, "--ours-dtypes 'measured,float32'"),
    (["--workload", "long"], None, "unknown --workload 'long'; use short, decode-heavy"),
    (["--ours-flags=--compute-dtype float16"], None, "give our compute dtypes with --ours-dtypes"),
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


@pytest.mark.parametrize("args, prompt_len, gen_len", [
    ([], 64, 16),
    (["--workload", "decode-heavy"], 64, 128),
    (["--workload", "decode-heavy", "--gen-len", "256"], 64, 256),
    (["--prompt-len", "32"], 32, 16),
])
def test_workload_sets_the_lengths_not_given(args, prompt_len, gen_len):
    from flexgen_dist.bench.__main__ import build_parser
    from flexgen_dist.bench.checks import check_args

    parsed = build_parser().parse_args(["--systems", "ours", "--blocks", "1x1", *args])
    check_args(parsed)
    assert (parsed.prompt_len, parsed.gen_len) == (prompt_len, gen_len)


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


BOUND_LINE = re.compile(r"^(ours|ours-in-memory) (\w+) (\d+x\d+): prefill [\d.]+, decode ([\d.]+), total ([\d.]+) tok/s; "
                        r"decode bound ([\d.]+) tok/s \((compute|load)-bound\) = ([\d.e+-]+) of the bound", re.M)
GiB = 2**30


def _hardware_file(path):
    """A CPU machine with known speeds: every bound the bench prints can be computed here."""
    from flexgen_dist.machine.hardware import Capacities, Hardware, Speeds

    speeds = Speeds(compute_dtype="float32", h2d_bw=10e9, d2h_bw=10e9, disk_read_bw=2e8, disk_write_bw=1e8,
                    matmul_flops=1e11, decode_matmul_flops=1e10, attention_flops=1e11, decode_attention_flops=1e10,
                    cpu_attention_flops=1e10, quantize_bw=1e9, dequantize_bw=1e9, elementwise_bw=5e10)
    capacities = Capacities(has_gpu=False, gpu_mem=16 * GiB, cpu_mem=16 * GiB, host_mem=16 * GiB, disk_mem=100 * GiB)
    Hardware(name="test machine", capacities=capacities, speeds=speeds).save(path)
    return path


def _expected_bound(model, hardware, attempt, prompt_len, gen_len, offload):
    """The bound of an attempt's policy, computed here for the dtype the attempt says it ran in."""
    from flexgen_dist.bench.bound import build_bound_model, policy_from_stats

    bound_model = build_bound_model(model, prompt_len=prompt_len, gen_len=gen_len, offload_dir=offload,
                                    hardware=hardware, compute_dtype=attempt["dtype"])
    return bound_model.bound(policy_from_stats(attempt["result"]["policy_fields"])).decode_tokens_per_s


def _bench(args, tmp_path, extra_env=None, timeout=300):
    # The bound's hardware profile is measured (quick) into the test's own cache, not the user's.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "FLEXGEN_CACHE_DIR": str(tmp_path / "cache"),
           **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "flexgen_dist.bench", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_compare_runs_every_dtype_and_reports_each_systems_best_with_bounds_and_ratios(tiny_models_cache, tmp_path):
    model = tiny_models_cache.get("llama", num_hidden_layers=4)
    out, hardware = tmp_path / "compare.json", _hardware_file(tmp_path / "hw.json")
    # A 1200 KiB budget (600 KiB a tier) cannot hold the fp32 weights on the gpu tier: ours offloads.
    proc = _bench(["--model", str(model), "--prompt-len", "8", "--gen-len", "3", "--systems", "ours,transformers",
                   "--batches", "2", "--blocks", "2x1,2x2", "--budget", "1200K", "--offload-dir", str(tmp_path / "off"),
                   "--ours-dtypes", "float32,bfloat16", "--baseline-dtypes", "float32,bfloat16",
                   "--hardware", str(hardware), "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["dtypes"] == {"ours": ["float32", "bfloat16"], "transformers": ["float32", "bfloat16"]}
    # Every system ran in every dtype asked for, each dtype at every size while it fitted: the
    # dtype each attempt reports is the one the child computed in (our plan's, transformers' model).
    assert [(a["dtype"], a["label"]) for a in data["ours"]] == [
        ("float32", "2x1"), ("float32", "2x2"), ("bfloat16", "2x1"), ("bfloat16", "2x2")]
    assert [(a["dtype"], a["batch"]) for a in data["transformers"]] == [("float32", 2), ("bfloat16", 2)]
    assert [a["result"]["dtype"] for a in data["transformers"]] == ["float32", "bfloat16"]
    assert all(a["ok"] for a in data["ours"] + data["transformers"] + data["ours-in-memory"])

    # Each of our runs is held against the bound of its own policy in its own dtype.
    lines = {(m.group(1), m.group(2), m.group(3)): m for m in BOUND_LINE.finditer(proc.stderr)}
    for a in data["ours"] + data["ours-in-memory"]:
        expected = _expected_bound(model, hardware, a, 8, 3, tmp_path / "off")
        assert a["bound"]["decode_tokens_per_s"] == pytest.approx(expected, rel=1e-9)
        assert a["fraction_of_bound"] == pytest.approx(a["result"]["decode_tokens_per_s"] / expected, rel=1e-9)
        m = lines[(a["system"], a["dtype"], a["label"])]
        assert float(m.group(6)) == pytest.approx(expected, abs=0.006)
        assert float(m.group(8)) == pytest.approx(a["fraction_of_bound"], rel=6e-3)  # printed to 3 digits
    # ... which differs between the dtypes: the gpu tier holds half the bytes in bfloat16.
    fp32, bf16 = (next(a for a in data["ours"] if a["dtype"] == d and a["label"] == "2x2") for d in ("float32", "bfloat16"))
    assert fp32["result"]["policy_fields"]["w_gpu_percent"] < bf16["result"]["policy_fields"]["w_gpu_percent"]
    # Each attempt's line is printed when it finishes: ours' before the next system starts.
    assert proc.stderr.index("ours bfloat16 2x2:") < proc.stderr.index("transformers float32: batches")
    assert re.search(r"^transformers bfloat16 2: prefill [\d.]+, decode [\d.]+", proc.stderr, re.M)

    # Ours' best is its highest total over both dtypes, run again with everything in memory.
    best = max(data["ours"], key=lambda a: a["result"]["total_tokens_per_s"])
    in_memory = data["ours-in-memory"][0]
    assert (in_memory["dtype"], in_memory["label"]) == (best["dtype"], best["label"])
    fields = in_memory["result"]["policy_fields"]
    assert (fields["w_gpu_percent"], fields["cache_gpu_percent"], fields["act_gpu_percent"]) == (100, 100, 100)
    ratio = re.search(rf"^offloaded decode / in-memory decode = ([\d.]+) \(block {best['label']}, {best['dtype']}:",
                      proc.stdout, re.M)
    assert ratio, proc.stdout
    assert float(ratio.group(1)) == pytest.approx(
        best["result"]["decode_tokens_per_s"] / in_memory["result"]["decode_tokens_per_s"], abs=0.006)

    # The table: each system's best in each dtype, its overall best marked, ours / it in total.
    rows = {}
    for line in proc.stdout.splitlines():
        if re.match(r"^[* ] (ours|transformers)", line):
            cells = line[2:].split()
            rows[(cells[0], cells[1])] = (line[0] == "*", cells)
    assert set(rows) == {("ours", "float32"), ("ours", "bfloat16"), ("transformers", "float32"),
                         ("transformers", "bfloat16"), ("ours-in-memory", best["dtype"])}
    transformers_best = max(data["transformers"], key=lambda a: a["result"]["total_tokens_per_s"])
    assert {key for key, (marked, _) in rows.items() if marked} == {
        ("ours", best["dtype"]), ("transformers", transformers_best["dtype"]), ("ours-in-memory", best["dtype"])}
    ours_row = rows[("ours", best["dtype"])][1]
    assert ours_row[3] == str(best["batch"]) and "1.00x" in ours_row
    for dtype in ("float32", "bfloat16"):  # a dtype's row is its best size
        in_dtype = [a for a in data["ours"] if a["dtype"] == dtype]
        top = max(in_dtype, key=lambda a: a["result"]["total_tokens_per_s"])
        assert rows[("ours", dtype)][1][3] == str(top["batch"])

    # The summary: ours over the baseline's best, in decode and in total, each at its best run.
    for measure, key in (("decode", "decode_tokens_per_s"), ("total", "total_tokens_per_s")):
        mine = max(a["result"][key] for a in data["ours"])
        theirs = max(a["result"][key] for a in data["transformers"])
        m = re.search(rf"^ours / transformers-best: .*{measure} ([\d.]+)x \(([\d.]+) at (\w+), block (\d+x\d+) / "
                      rf"([\d.]+) at (\w+), batch 2\)", proc.stdout, re.M)
        assert m, proc.stdout
        assert float(m.group(1)) == pytest.approx(mine / theirs, abs=0.006)
        assert (float(m.group(2)), float(m.group(5))) == (pytest.approx(mine, abs=0.006), pytest.approx(theirs, abs=0.006))
    assert f"| ours | {best['dtype']}, block {best['label']} |" in proc.stdout


def test_ours_flags_reach_every_run_of_ours_and_bad_ones_stop_before_any_work(tiny_models_cache, tmp_path):
    model = tiny_models_cache.get("llama", num_hidden_layers=2)
    out = tmp_path / "compare.json"
    # No dtype flags: ours runs in each dtype the bench measured as running well here.
    proc = _bench(["--model", str(model), "--prompt-len", "8", "--gen-len", "2", "--systems", "ours", "--blocks", "2x1",
                   "--ours-flags=--compress-weight --compress-cache", "--offload-dir", str(tmp_path / "off"),
                   "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = re.search(r"^compute dtypes: matmul GFLOP/s on cpu .*; running ([\w, ]+?)(?: \(left out|$)", proc.stderr,
                         re.M)
    assert measured, proc.stderr
    data = json.loads(out.read_text())
    assert data["dtypes"] == {"ours": measured.group(1).split(", ")}
    # No --budget: after the blocks, the planner's own run for as many prompts as the largest batch.
    assert [(a["dtype"], a["label"]) for a in data["ours"]] == [
        (dtype, label) for dtype in data["dtypes"]["ours"] for label in ("2x1", "auto")]
    for run in data["ours"] + data["ours-in-memory"]:
        fields = run["result"]["policy_fields"]
        assert fields["compress_weight"] and fields["compress_cache"], (run["label"], fields)

    for flags, said in (("--compress-bits x", "invalid int value"), ("--no-such-flag", "has no --no-such-flag"),
                        ("--offload-dir /elsewhere", "set by the bench itself"),
                        ("--compute-dtype float16", "--ours-dtypes")):
        proc = _bench(["--shape", "opt-125m", "--systems", "ours", f"--ours-flags={flags}",
                       "--offload-dir", str(tmp_path / "bad")], tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("error: --ours-flags") and said in proc.stderr, proc.stderr
        assert not (tmp_path / "bad").exists()  # refused before the checkpoint is written


def test_sweep_writes_a_csv_and_a_chart(tmp_path):
    csv_path, png, hardware = tmp_path / "sweep.csv", tmp_path / "sweep.png", _hardware_file(tmp_path / "hw.json")
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    args = ["--sweep", "--shape", "tiny-opt", "--prompt-len", "8", "--gen-len", "3", "--systems", "ours,transformers",
            "--batches", "2", "--blocks", "2x1,2x2", "--placements", "gpu,disk", "--offload-dir", str(tmp_path / "off"),
            "--ours-dtypes", "float32", "--baseline-dtypes", "bfloat16", "--hardware", str(hardware),
            "--sweep-csv", str(csv_path), "--json", str(tmp_path / "sweep.json")]
    proc = _bench(args + (["--sweep-png", str(png)] if has_matplotlib else []), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with csv_path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert [(r["system"], r["dtype"], r["run"]) for r in rows] == [
        ("ours", "float32", "2x1 gpu"), ("ours", "float32", "2x2 gpu"), ("ours", "float32", "2x1 disk"),
        ("ours", "float32", "2x2 disk"), ("transformers", "bfloat16", "2")]
    for r in rows:
        assert r["error"] == ""
        # one block per run: its throughput times its latency is the block's generated tokens
        assert float(r["total_tokens_per_s"]) * float(r["block_latency_s"]) == pytest.approx(int(r["batch"]) * 3, rel=1e-6)
        assert int(r["peak_mem_bytes"]) > 0
    runs = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    checkpoint = tmp_path / "off" / "checkpoint-tiny-opt-float16"
    for r, a in zip(rows[:4], runs):
        # of_bound is the run's decode over the bound of its own policy on the given machine
        expected = _expected_bound(checkpoint, hardware, a, 8, 3, tmp_path / "off")
        assert float(r["decode_bound_tokens_per_s"]) == pytest.approx(expected, rel=1e-9)
        assert float(r["of_bound"]) == pytest.approx(float(r["decode_tokens_per_s"]) / expected, rel=1e-9)
    # a slower disk-bound run: with every weight read from disk each step, its bound is below the in-memory one
    assert float(rows[2]["decode_bound_tokens_per_s"]) < float(rows[0]["decode_bound_tokens_per_s"])
    assert "w 0/0/100" in rows[2]["policy"] and "w 100/0/0" in rows[0]["policy"]
    assert re.search(r"^\* ours +float32 ", proc.stdout, re.M)  # the frontier is marked in the table
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


def test_the_auto_run_is_planned_under_the_cap_as_a_user_runs_it(tmp_path, monkeypatch):
    """Accelerate's budget bounds its weights only; ours bounds weights, cache and buffers. So ours
    also runs as a user would start it under the cap: no block and no capacities given, the
    planner sizing both from what it detects; the best of all runs counts."""
    from flexgen_dist.bench import compare
    from flexgen_dist.bench.runs import Attempt

    w = compare.Workload(model_dir=tmp_path, prompt_len=8, gen_len=2, mem_limit=4 << 30, budget=(4 << 30) - (3 << 29),
                         offload_dir=tmp_path)
    auto = compare.OursRun(block=None, use_budget=False, label="auto", num_prompts=64)
    cmd = " ".join(compare.ours_command(w, auto, tmp_path / "stats.json"))
    assert "--num-prompts 64" in cmd and "--gpu-mem" not in cmd and "--gpu-batch-size" not in cmd
    fixed = " ".join(compare.ours_command(w, compare.OursRun(block=(2, 1)), tmp_path / "stats.json"))
    assert f"--gpu-mem {w.budget // 2} --cpu-mem {w.budget // 2}" in fixed and "--num-prompts 2" in fixed

    speeds = {"2x1": 5.0, "4x1": 7.0, "auto": 9.0}
    seen = []

    def fake_run(workload, run, bounds=None):
        seen.append(run)
        return Attempt(system="ours", batch=0, ok=True, label=run.name, result={"total_tokens_per_s": speeds[run.name]})

    monkeypatch.setattr(compare, "run_ours", fake_run)
    best, attempts = compare.best_ours(w, [(2, 1), (4, 1)], dtype="bfloat16", auto_prompts=64)
    assert [a.label for a in attempts] == ["2x1", "4x1", "auto"] and best.label == "auto"
    assert (seen[-1].block, seen[-1].use_budget, seen[-1].num_prompts, seen[-1].compute_dtype) == (None, False, 64, "bfloat16")
    speeds["auto"] = 1.0
    best, _ = compare.best_ours(w, [(2, 1), (4, 1)], auto_prompts=64)
    assert best.label == "4x1"
    _, attempts = compare.best_ours(w, [(2, 1)])
    assert [a.label for a in attempts] == ["2x1"]  # no auto run when the user gave a budget


def test_the_in_memory_run_keeps_its_own_placement_over_the_users_percent(tmp_path):
    """--ours-flags is given to every run of ours; a --percent there came after the in-memory run's
    own --percent 100 0 100 0 100 0 and replaced it, so 'in memory' ran the offloaded placement
    and the offload ratio compared a run with itself."""
    from flexgen_dist.bench import compare

    w = compare.Workload(model_dir=tmp_path, prompt_len=8, gen_len=2, mem_limit=None, budget=None, offload_dir=tmp_path,
                         ours_args=("--percent", "0", "0", "0", "100", "100", "0", "--compress-cache"))
    run, _ = compare.in_memory_run(w, (2, 1), bounds=None)
    cmd = compare.ours_command(w, run, tmp_path / "stats.json")
    assert cmd.count("--percent") == 1
    at = cmd.index("--percent")
    assert cmd[at + 1:at + 7] == list(compare.IN_MEMORY_PERCENT) and "--compress-cache" in cmd
    offloaded = compare.ours_command(w, compare.OursRun(block=(2, 1)), tmp_path / "stats.json")
    assert offloaded[offloaded.index("--percent") + 1:][:6] == ["0", "0", "0", "100", "100", "0"]
