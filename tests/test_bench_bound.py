"""The bench's pure parts: the bound of a policy from the cost model, the policy read back from a
stats JSON, the sweep's grid, its Pareto frontier and its CSV (no child processes, no timing)."""

from __future__ import annotations

import csv
import dataclasses
import random
import re

import pytest

from flexgen_dist.bench.bound import Bound, build_bound_model, policy_from_stats
from flexgen_dist.bench.runs import Attempt
from flexgen_dist.bench.sweep import (CSV_COLUMNS, PLACEMENTS, frontier_by_system, grid_runs, pareto_front,
                                      parse_placements, planner_points, write_csv)
from flexgen_dist.errors import NotSupportedYet, UserError
from flexgen_dist.planning.compression import CompressionConfig
from flexgen_dist.machine.hardware import Capacities, Hardware, Speeds
from flexgen_dist.planning.placement import Tier
from flexgen_dist.planning.policy import Policy

GiB = 2**30


def _hardware(disk_read_bw: float) -> Hardware:
    speeds = Speeds(compute_dtype="float32", h2d_bw=10e9, d2h_bw=10e9, disk_read_bw=disk_read_bw, disk_write_bw=1e9,
                    matmul_flops=1e11, decode_matmul_flops=1e10, attention_flops=1e11, decode_attention_flops=1e10,
                    cpu_attention_flops=1e10, quantize_bw=1e9, dequantize_bw=1e9, elementwise_bw=5e10)
    capacities = Capacities(has_gpu=False, gpu_mem=16 * GiB, cpu_mem=16 * GiB, host_mem=16 * GiB, disk_mem=100 * GiB)
    return Hardware(name="test machine", capacities=capacities, speeds=speeds)


@pytest.fixture
def bound_model(llama_dir, tmp_path):
    def make(disk_read_bw: float):
        path = tmp_path / f"hw-{disk_read_bw:g}.json"
        _hardware(disk_read_bw).save(path)
        return build_bound_model(llama_dir, prompt_len=8, gen_len=4, offload_dir=tmp_path, hardware=path)

    return make


def test_a_disk_bound_policy_is_bounded_by_its_disk_reads(bound_model):
    # A slow disk: each decode step's load path (every weight read from disk) is far longer than
    # its compute path, so the bound is block * disk bandwidth / bytes of weights on disk.
    model = bound_model(disk_read_bw=1e5)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=0)
    bound = model.bound(policy)
    # every weight read from disk once per step, but the embedding table: a step reads its rows only
    disk_bytes = sum(w.nbytes for places in model.placement(policy).weights.values() for w in places
                     if w.tier is Tier.DISK and not w.gathered)
    assert disk_bytes > 0
    assert bound.limiter == "load"
    assert bound.decode_tokens_per_s == pytest.approx(4 * 1e5 / disk_bytes, rel=1e-6)
    assert bound.decode_load_s > bound.decode_compute_s
    assert "--hardware" in model.hardware_source


def test_in_memory_bound_is_compute_and_above_the_offloaded_one(bound_model):
    model = bound_model(disk_read_bw=1e8)
    in_memory = model.bound(Policy(gpu_batch_size=2))
    on_disk = model.bound(Policy(gpu_batch_size=2, w_gpu_percent=0, w_cpu_percent=0))
    assert in_memory.limiter == "compute" and in_memory.decode_load_s == 0
    assert in_memory.decode_tokens_per_s > on_disk.decode_tokens_per_s
    # The cost model's own estimate (the larger path per layer) can only be slower than the bound.
    for bound in (in_memory, on_disk):
        assert bound.predicted_decode_tokens_per_s <= bound.decode_tokens_per_s * (1 + 1e-9)


def test_the_bound_uses_the_childs_dtypes(bound_model, llama_dir):
    model = bound_model(disk_read_bw=1e8)
    assert model.dtypes.compute == "float32"  # the CPU rule of api/runtime.py
    assert model.workload.prompt_len == 8 and model.workload.gen_len == 4


def test_one_new_token_has_no_decode_bound(llama_dir, tmp_path):
    path = tmp_path / "hw.json"
    _hardware(1e8).save(path)
    model = build_bound_model(llama_dir, prompt_len=8, gen_len=1, offload_dir=tmp_path, hardware=path)
    bound = model.bound(Policy(gpu_batch_size=2))
    assert bound.decode_tokens_per_s is None and bound.fraction(10.0) is None
    assert bound.prefill_tokens_per_s > 0


def test_fraction_is_measured_over_bound():
    bound = Bound(prefill_tokens_per_s=100.0, decode_tokens_per_s=40.0, limiter="load", decode_compute_s=1.0,
                  decode_load_s=2.0, predicted_decode_tokens_per_s=30.0, predicted_block_s=1.0)
    assert bound.fraction(10.0) == pytest.approx(0.25)


def test_policy_from_stats_round_trips_every_field():
    policy = Policy(gpu_batch_size=3, num_gpu_batches=2, w_gpu_percent=20, w_cpu_percent=30, cache_gpu_percent=0,
                    cache_cpu_percent=100, act_cpu_percent=0, overlap=False, cpu_cache_compute=True, compress_weight=True,
                    compression=CompressionConfig(bits=8, group_size=32), cache_dtype="float16")
    assert policy_from_stats(dataclasses.asdict(policy)) == policy


def test_policy_from_stats_refuses_a_field_it_does_not_know():
    fields = dataclasses.asdict(Policy())
    fields["new_knob"] = 1
    with pytest.raises(ValueError, match="new_knob"):
        policy_from_stats(fields)


# ---------------------------------------------------------------- the sweep's grid


def test_placements_by_name_and_by_numbers():
    placements = parse_placements("gpu, disk,20/30/100/0/50/50")
    assert [p.name for p in placements] == ["gpu", "disk", "20/30/100/0/50/50"]
    assert placements[1].percent == PLACEMENTS["disk"]
    assert placements[2].percent == (20, 30, 100, 0, 50, 50)


@pytest.mark.parametrize("text", ["tape", "20/30/100/0/100", "60/50/100/0/100/0", "a/b/c/d/e/f", ""])
def test_bad_placements_are_one_line_user_errors(text):
    with pytest.raises(UserError) as info:
        parse_placements(text)
    assert "\n" not in str(info.value) and "--placements" in str(info.value)


def test_grid_runs_each_placement_smallest_block_first():
    groups = grid_runs([(8, 4), (2, 1), (4, 1)], parse_placements("gpu,disk"))
    assert [[r.block for r in g] for g in groups] == [[(2, 1), (4, 1), (8, 4)]] * 2
    assert groups[1][0].percent == ("0", "0", "100", "0", "100", "0") and not groups[1][0].use_budget
    assert groups[1][0].label == "2x1 disk"


def test_planner_points_wait_for_the_cli_then_pass_its_flags():
    with pytest.raises(NotSupportedYet, match="--max-latency"):
        planner_points([10.0], {"--percent", "--gpu-batch-size"})
    assert planner_points([], set()) == []
    runs = planner_points([10.0, 2.5], {"--policy", "--max-latency"})
    assert [r.extra_args for r in runs] == [("--policy", "auto", "--max-latency", "10"),
                                            ("--policy", "auto", "--max-latency", "2.5")]
    assert all(r.block is None for r in runs)  # the planner picks the block


# ---------------------------------------------------------------- Pareto frontier


def test_pareto_front_on_known_points():
    points = [(1, 10), (2, 5), (2, 20), (3, 20), (0.5, 1), (4, 30)]
    assert pareto_front(points) == [4, 0, 2, 5]
    assert pareto_front([]) == []


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        points = [(rng.uniform(0.1, 10), rng.uniform(1, 100)) for _ in range(rng.randrange(1, 12))]
        brute = {i for i, (x, y) in enumerate(points)
                 if not any(j != i and xj <= x and yj >= y for j, (xj, yj) in enumerate(points))}
        front = pareto_front(points)
        assert set(front) == brute
        assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


def _attempt(system: str, label: str, latency: float, total: float, ok: bool = True) -> Attempt:
    result = {"prefill_s": latency / 4, "decode_s": latency * 3 / 4, "total_tokens_per_s": total,
              "prefill_tokens_per_s": 1.0, "decode_tokens_per_s": total} if ok else None
    return Attempt(system=system, batch=2, ok=ok, result=result, label=label, error="" if ok else "out of memory")


def test_frontier_is_per_system_and_skips_failures():
    rows = [_attempt("ours", "a", 1.0, 10.0), _attempt("ours", "b", 2.0, 5.0), _attempt("transformers", "8", 3.0, 4.0),
            _attempt("ours", "c", 0.5, 1.0, ok=False)]
    assert frontier_by_system(rows) == {0, 2}  # ours' b is beaten by a; transformers' only point is on its own


def test_csv_has_a_row_per_run_failures_included(tmp_path):
    rows = [_attempt("ours", "2x1 gpu", 2.0, 10.0), _attempt("ours", "2x2 gpu", 0.0, 0.0, ok=False)]
    path = tmp_path / "sweep.csv"
    write_csv(rows, path)
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        read = list(reader)
    assert [r["run"] for r in read] == ["2x1 gpu", "2x2 gpu"]
    assert float(read[0]["block_latency_s"]) == pytest.approx(2.0)
    assert read[1]["error"] == "out of memory" and read[1]["total_tokens_per_s"] == ""


def test_attempt_line_names_the_bound_and_flags_a_run_above_it():
    from flexgen_dist.bench.report import format_attempt

    attempt = _attempt("ours", "8x1", 1.0, 100.0)  # decode 100 tok/s
    attempt.bound = Bound(prefill_tokens_per_s=1e3, decode_tokens_per_s=200.0, limiter="load", decode_compute_s=1.0,
                          decode_load_s=2.0, predicted_decode_tokens_per_s=150.0, predicted_block_s=1.0)
    line = format_attempt(attempt)
    assert line.startswith("ours 8x1: prefill ")
    assert "decode bound 200.00 tok/s (load-bound) = 0.5 of the bound" in line and "ABOVE" not in line
    attempt.bound = dataclasses.replace(attempt.bound, decode_tokens_per_s=50.0)
    assert "= 2 of the bound (ABOVE the bound" in format_attempt(attempt)


# ---------------------------------------------------------------- compute dtypes


def test_the_bound_model_of_a_dtype_computes_in_it_and_is_built_once(bound_model, llama_dir, tmp_path):
    from flexgen_dist.bench.bound import BoundModels

    path = tmp_path / "hw.json"
    _hardware(1e8).save(path)
    built = []

    def build(dtype):
        built.append(dtype)
        return build_bound_model(llama_dir, prompt_len=8, gen_len=4, offload_dir=tmp_path, hardware=path,
                                 compute_dtype=dtype)

    models = BoundModels(build)
    bf16 = models.for_dtype("bfloat16")
    assert models.for_dtype("bfloat16") is bf16 and built == ["bfloat16"]
    assert (bf16.dtypes.compute, models.for_dtype("float32").dtypes.compute) == ("bfloat16", "float32")
    # the gpu tier holds weights in the compute dtype: half the bytes in bfloat16
    policy = Policy(gpu_batch_size=2)
    fp32_bytes = models.for_dtype("float32").placement(policy).weight_bytes()[Tier.GPU]
    assert models.for_dtype("bfloat16").placement(policy).weight_bytes()[Tier.GPU] < fp32_bytes


def _shapes():
    from flexgen_dist.bench.bound import bench_shapes

    return bench_shapes(2048, 64)


@pytest.mark.parametrize("machine, rates, run", [
    # AVX2 only: 16-bit matmuls several times slower than fp32
    ("avx2", {"float32": (60e9, 140e9), "float16": (10e9, 13e9), "bfloat16": (12e9, 20e9)}, ("float32",)),
    # AVX-512 BF16 / AMX: bfloat16 several times faster than fp32, float16 not
    ("bf16 native", {"float32": (58e9, 142e9), "float16": (40e9, 44e9), "bfloat16": (265e9, 415e9)}, ("bfloat16",)),
    # close: both run, the one with the better worst share first
    ("close", {"float32": (50e9, 100e9), "float16": (5e9, 5e9), "bfloat16": (45e9, 60e9)}, ("float32", "bfloat16")),
    # each fastest at one shape and under half at the other: the best worst share still runs
    ("split", {"float32": (100e9, 10e9), "bfloat16": (10e9, 30e9)}, ("float32",)),
])
def test_dtypes_run_are_those_at_least_half_the_fastest_at_every_shape(machine, rates, run):
    from flexgen_dist.bench.bound import choose_dtypes

    choice = choose_dtypes(rates, _shapes())
    assert choice.run == run, machine
    assert set(choice.left_out) == set(rates) - set(run)


def test_a_left_out_dtype_says_its_share_of_the_fastest_and_where():
    from flexgen_dist.bench.bound import choose_dtypes, describe_dtypes

    shapes = _shapes()
    choice = choose_dtypes({"float32": (58e9, 142e9), "bfloat16": (265e9, 415e9)}, shapes)
    assert choice.left_out == {"float32": f"0.22 of bfloat16 at {shapes[0]}"}
    line = describe_dtypes({"float32": (58e9, 142e9), "bfloat16": (265e9, 415e9)}, shapes, choice, "cpu")
    assert "float32 58.0/142.0; bfloat16 265.0/415.0; running bfloat16 (left out: float32 0.22 of bfloat16" in line


def test_bench_shapes_are_a_decode_step_and_a_capped_prefill():
    from flexgen_dist.bench.bound import DECODE_ROWS, PREFILL_ROWS, bench_shapes

    decode, prefill = bench_shapes(2048, 64)
    assert (decode.rows, decode.dim, prefill.rows, prefill.dim) == (DECODE_ROWS, 2048, PREFILL_ROWS, 2048)
    assert bench_shapes(64, 2)[1].rows == DECODE_ROWS  # never fewer rows than a decode step
    assert bench_shapes(64, 16)[1].rows == 128  # the smallest batch (8) of 16-token prompts


def test_measure_times_each_dtype_at_each_shape(monkeypatch):
    import torch
    import torch.nn.functional as F

    from flexgen_dist.bench.bound import MatmulShape, measure_matmul_rates

    seen = []
    real = F.linear

    def linear(x, w):
        seen.append((x.dtype, tuple(x.shape), tuple(w.shape)))
        return real(x, w)

    monkeypatch.setattr(F, "linear", linear)
    shapes = (MatmulShape(4, 16), MatmulShape(8, 16))
    rates = measure_matmul_rates(("float32", "bfloat16"), shapes, repeats=2)
    assert list(rates) == ["float32", "bfloat16"] and all(len(r) == 2 and min(r) > 0 for r in rates.values())
    assert {(dtype, x, w) for dtype, x, w in seen} == {
        (dtype, (rows, 16), (16, 16)) for dtype in (torch.float32, torch.bfloat16) for rows in (4, 8)}


@pytest.mark.parametrize("text, allowed, expected", [
    ("measured", ("float32",), None),
    ("bfloat16, float32,bfloat16", ("float32", "bfloat16"), ["bfloat16", "float32"]),
    ("auto", ("auto", "float32"), ["auto"]),
])
def test_dtype_flags(text, allowed, expected):
    from flexgen_dist.bench.bound import parse_dtypes

    assert parse_dtypes(text, "--x", allowed) == expected


@pytest.mark.parametrize("text", ["", "fp32", "measured,float32", "auto"])
def test_bad_dtype_flags_are_one_line_user_errors(text):
    from flexgen_dist.bench.bound import DTYPES, parse_dtypes

    with pytest.raises(UserError, match="--baseline-dtypes"):
        parse_dtypes(text, "--baseline-dtypes", DTYPES)


def test_the_grid_runs_every_placement_in_every_dtype():
    groups = grid_runs([(2, 1)], parse_placements("gpu,disk"), ["float32", "bfloat16"])
    assert [(g[0].compute_dtype, g[0].label) for g in groups] == [
        ("float32", "2x1 gpu"), ("float32", "2x1 disk"), ("bfloat16", "2x1 gpu"), ("bfloat16", "2x1 disk")]


def _run(system: str, dtype: str, batch: int, decode: float, total: float, label: str = "") -> Attempt:
    result = {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": decode, "total_tokens_per_s": total,
              "prefill_s": 1.0, "decode_s": 1.0}
    return Attempt(system=system, batch=batch, ok=True, result=result, label=label or str(batch), dtype=dtype)


def test_summary_holds_ours_against_each_baselines_best_run_per_measure():
    from flexgen_dist.bench.report import format_summary

    attempts = {
        "ours": [_run("ours", "float32", 8, 20.0, 14.0, "8x1"), _run("ours", "bfloat16", 32, 24.0, 16.0, "32x1"),
                 Attempt(system="ours", batch=64, ok=False, error="out of memory", dtype="bfloat16")],
        # Accelerate's best decode (bfloat16, 16) is not its best total (float32, 8): each ratio uses its own
        "accelerate": [_run("accelerate", "float32", 8, 10.0, 8.0), _run("accelerate", "bfloat16", 16, 12.0, 7.5)],
    }
    text = format_summary(attempts, prompt_len=64, gen_len=128, cap="4.00 GiB")
    assert text.splitlines()[0] == "summary: prompt 64, 128 new tokens, memory cap 4.00 GiB"
    assert "| ours | bfloat16, block 32x1 | 100.00 | 24.00 | 16.00 |" in text
    assert "| accelerate | float32, batch 8 | 100.00 | 10.00 | 8.00 |" in text
    assert ("ours / accelerate-best: decode 2.00x (24.00 at bfloat16, block 32x1 / 12.00 at bfloat16, batch 16); "
            "total 2.00x (16.00 at bfloat16, block 32x1 / 8.00 at float32, batch 8)") in text


def test_summary_says_when_a_system_has_no_successful_run():
    from flexgen_dist.bench.report import format_summary

    attempts = {"ours": [_run("ours", "float32", 8, 20.0, 14.0, "8x1")],
                "accelerate": [Attempt(system="accelerate", batch=8, ok=False, error="out of memory", dtype="float32")]}
    text = format_summary(attempts, prompt_len=64, gen_len=16, cap="none")
    assert "| accelerate | failed: out of memory | | | |" in text
    assert "ours / accelerate-best: decode not measured (accelerate has no successful run)" in text


def test_table_marks_each_systems_best_and_names_the_dtype_of_every_row():
    from flexgen_dist.bench.report import format_table

    ours = [_run("ours", "float32", 8, 20.0, 14.0, "8x1"), _run("ours", "bfloat16", 8, 24.0, 16.0, "8x1"),
            _run("ours", "bfloat16", 32, 30.0, 12.0, "32x1")]
    accelerate = [_run("accelerate", "float32", 8, 10.0, 8.0), _run("accelerate", "float32", 16, 11.0, 4.0)]
    table = format_table("m", {"ours": ours[1], "accelerate": accelerate[0]}, {"ours": ours, "accelerate": accelerate})
    rows = [(line[0], *line[2:].split()[:4], re.search(r" ([\d.]+x) ", line).group(1)) for line in table.splitlines()[1:]]
    # (mark, system, dtype, model, batch, ours / it): one row per system and dtype, its best size
    assert rows == [("*", "ours", "bfloat16", "m", "8", "1.00x"), (" ", "ours", "float32", "m", "8", "1.14x"),
                    ("*", "accelerate", "float32", "m", "8", "2.00x")]
