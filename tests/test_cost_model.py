"""The cost model: its memory side is the placement's, its times follow the hardware's speeds and
behave as the engine does (faster tiers, longer sequences, compression, CPU attention, ranks)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from flexgen_dist.planning.compression import CompressionConfig
from planner_cases import cpu_machine, gpu_machine, llama_spec, opt_spec, place, policy

from flexgen_dist.parallel.partition import partition_layers
from flexgen_dist.planning.cost_model import (
    DEFAULT_LINK_BW,
    estimate,
    estimate_pipeline,
    partition_costs,
    stage_times,
    task_time,
)
from flexgen_dist.spec.layout import model_units
from flexgen_dist.planning.placement import Buffers, Workload

SPEC = opt_spec()


@pytest.mark.parametrize("machine", [gpu_machine(), cpu_machine()], ids=["gpu", "cpu"])
@pytest.mark.parametrize("percent", [(100, 0, 100, 0, 100, 0), (30, 30, 34, 33, 50, 50), (0, 0, 0, 0, 0, 0)])
def test_memory_side_is_the_placements_bytes(machine, percent):
    p = place(SPEC, policy(percent, gbs=3, num_batches=3), machine)
    assert estimate(p, machine).peak_bytes == (p.bytes_per_tier(),)


def _elementwise(spec, rows: int, itemsize: int, speeds) -> float:
    """A decoder layer's elementwise passes over `rows` tokens, by hand (cost_terms' count)."""
    q_dim, kv_dim = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_row = 20 * spec.hidden_size + 12 * q_dim + 14 * kv_dim + 5 * spec.intermediate_size
    return rows * per_row * itemsize / speeds.elementwise_bw


def _gemm(sp, rows: int, numel: int) -> float:
    """A GEMM by hand: the weights' fixed time (what the 32-row decode rate takes beyond the peak
    rate) plus each row at the peak (prefill) rate."""
    fixed = 2 * 32 / sp.decode_matmul_flops - 2 * 32 / sp.matmul_flops
    return numel * (fixed + 2 * rows / sp.matmul_flops)


def _one_layer():
    spec = opt_spec(layers=1)
    block = next(unit for unit in model_units(spec) if unit.has_cache)
    numel = sum(ws.numel for ws in block.weights)
    matmul_numel = sum(ws.numel for ws in block.weights if len(ws.shape) == 2)
    return spec, block, numel, matmul_numel


def test_a_decode_step_and_a_prefill_by_hand_on_a_gpu():
    spec, block, numel, matmul_numel = _one_layer()
    assert (numel, matmul_numel) == (49984, 4 * 64 * 64 + 2 * 64 * 256)
    hw = gpu_machine()
    s, b, k, t, q_dim = 16, 3, 2, 2, 64
    p = place(spec, policy((0, 100, 100, 0, 100, 0), gbs=b, num_batches=k), hw)  # weights in host memory
    sp = hw.speeds
    link = numel * 2 / sp.h2d_bw  # fp16 storage, once per task
    decode = task_time(p, hw, t).layers[1]
    matmul = k * _gemm(sp, b, matmul_numel)
    compute = matmul + k * 2 * b * (s + t) * q_dim * 2 / sp.decode_attention_flops + k * _elementwise(spec, b, 2, sp)
    assert decode.kind == "block" and decode.seconds == pytest.approx(max(compute, link), rel=1e-12)
    prefill = task_time(p, hw, 0).layers[1]
    matmul = k * _gemm(sp, b * s, matmul_numel)
    compute = matmul + k * 4 * b * s * s * q_dim / sp.attention_flops + k * _elementwise(spec, b * s, 2, sp)
    assert prefill.seconds == pytest.approx(max(compute, link), rel=1e-12)
    off = place(spec, policy((0, 100, 100, 0, 100, 0), gbs=b, num_batches=k, overlap=False), hw)
    assert task_time(off, hw, 0).layers[1].seconds == pytest.approx(compute + link, rel=1e-12)


def test_without_a_gpu_the_host_copy_of_weights_adds_to_compute():
    spec, block, numel, matmul_numel = _one_layer()
    hw = cpu_machine()
    s, b, k, t, q_dim = 16, 3, 2, 2, 64
    p = place(spec, policy((0, 100, 100, 0, 100, 0), gbs=b, num_batches=k), hw)
    sp = hw.speeds
    convert = (numel * 2 + numel * 4) / 2 / sp.h2d_bw  # fp16 host copy converted to fp32
    matmul = k * _gemm(sp, b, matmul_numel)
    compute = matmul + k * 2 * b * (s + t) * q_dim * 2 / sp.decode_attention_flops + k * _elementwise(spec, b, 4, sp)
    assert task_time(p, hw, t).layers[1].seconds == pytest.approx(compute + convert, rel=1e-12)


GRID = [(0, 0), (0, 50), (0, 100), (50, 0), (50, 50), (100, 0)]


@pytest.mark.parametrize("machine", [gpu_machine(), cpu_machine()], ids=["gpu", "cpu"])
@pytest.mark.parametrize("cpu_attention", [False, True])
@pytest.mark.parametrize("kind_idx", [0, 1, 2], ids=["weights", "cache", "acts"])
def test_more_on_faster_tiers_never_predicts_slower(machine, cpu_attention, kind_idx):
    others = (40, 30)
    for gpu, cpu in GRID:
        for faster in ((gpu + 50, cpu - 50), (gpu, cpu + 50)):  # cpu -> gpu, disk -> cpu
            if faster[1] < 0 or sum(faster) > 100:
                continue
            times = []
            for pair in ((gpu, cpu), faster):
                percent = list(others * 3)
                percent[2 * kind_idx: 2 * kind_idx + 2] = pair
                p = place(SPEC, policy(tuple(percent), gbs=2, num_batches=2, cpu_cache_compute=cpu_attention), machine)
                times.append(estimate(p, machine).total_s)
            assert times[1] <= times[0] * (1 + 1e-12), (kind_idx, (gpu, cpu), faster, times)


@pytest.mark.parametrize("percent", [(100, 0, 100, 0, 100, 0), (0, 50, 0, 0, 0, 100), (50, 0, 50, 50, 100, 0)])
def test_decode_time_grows_with_the_sequence(percent):
    hw = gpu_machine()
    p = place(SPEC, policy(percent), hw, workload=Workload(16, 12))
    steps = [t.seconds for t in stage_times(p, hw).decode_steps]
    assert all(a < b for a, b in zip(steps, steps[1:]))


@pytest.mark.parametrize("machine", [gpu_machine(), cpu_machine()], ids=["gpu", "cpu"])
def test_compression_moves_fewer_bytes_and_pays_dequantization(machine):
    spec = opt_spec(hidden=128, heads=2)  # head_dim 64: one group of 64 per cache vector
    base = policy((0, 50, 0, 50, 100, 0))
    plain = task_time(place(spec, base, machine), machine, 4)
    minmax = CompressionConfig(cache_method="minmax")
    for switch in ("compress_weight", "compress_cache"):
        packed = task_time(place(spec, base.replace(**{switch: True}, compression=minmax), machine), machine, 4)
        field = "weight" if switch == "compress_weight" else "cache"
        moved = lambda w: getattr(w, f"{field}_link") + getattr(w, f"{field}_disk")  # noqa: E731
        assert moved(packed.work) < moved(plain.work) / 2  # 4 bits (plus scales) instead of 16
        assert packed.work.codec > plain.work.codec == 0
    # KIVI's window (a group of slots of keys and of values in full precision) moves too
    kivi = task_time(place(spec, base.replace(compress_cache=True), machine), machine, 4)
    assert moved(kivi.work) > moved(packed.work) and kivi.work.cache_store > packed.work.cache_store


def test_cpu_attention_removes_the_cache_transfer():
    hw = gpu_machine()
    on_host = policy((100, 0, 0, 100, 100, 0))
    moved = task_time(place(SPEC, on_host, hw), hw, 4).work
    in_place = task_time(place(SPEC, on_host.replace(cpu_cache_compute=True), hw), hw, 4).work
    assert moved.cache_link > 0 and moved.cpu_attention == 0
    assert in_place.cache_link == 0 and in_place.cpu_attention > 0 and in_place.attention < moved.attention


def test_a_16bit_cache_halves_its_traffic_and_converts_on_a_cpu():
    hw = cpu_machine()
    on_disk = policy((100, 0, 0, 0, 100, 0))
    full = task_time(place(SPEC, on_disk, hw), hw, 4).work
    half = task_time(place(SPEC, on_disk.replace(cache_dtype="float16"), hw), hw, 4).work
    assert half.cache_disk == pytest.approx(full.cache_disk / 2)
    assert half.codec > full.codec == 0


def test_sparse_attention_loads_a_fraction_of_the_values():
    hw = gpu_machine()
    on_host = policy((100, 0, 0, 100, 100, 0))
    dense = task_time(place(SPEC, on_host, hw), hw, 4).work
    sparse = task_time(place(SPEC, on_host.replace(attn_sparsity=0.5), hw), hw, 4).work
    assert sparse.cache_link == pytest.approx(dense.cache_link * 0.75)  # all keys, half the values


def _stage_units(spec, num_ranks):
    units = model_units(spec)
    blocks = units[1:-1]
    ranges = partition_layers([1.0] * len(blocks), num_ranks)
    out = []
    for rank, layers in enumerate(ranges):
        mine = [blocks[i] for i in layers]
        out.append(([units[0]] if rank == 0 else []) + mine + ([units[-1]] if rank == num_ranks - 1 else []))
    return out


def test_more_ranks_cut_the_time_of_each_rank_and_the_pipeline_runs_at_the_slowest():
    spec, hw = opt_spec(layers=8), gpu_machine()
    pol = policy((0, 100, 100, 0, 100, 0), gbs=4, num_batches=2)
    whole = place(spec, pol, hw)
    stages = [place(spec, pol, hw, units=units, buffers=Buffers(separate_gpu=True, num_ranks=2))
              for units in _stage_units(spec, 2)]
    for stage in stages:
        assert task_time(stage, hw, 0).seconds < task_time(whole, hw, 0).seconds
        assert task_time(stage, hw, 3).seconds < task_time(whole, hw, 3).seconds
    est = estimate_pipeline(stages, hw, num_prompts=4 * pol.block_size)
    # two groups of 2 blocks; a token step of a group: max(2 x slowest rank, the ring)
    expected = 0.0
    for t in range(whole.workload.gen_len):
        tasks = [task_time(stage, hw, t) for stage in stages]
        busiest = max(max(x.seconds, x.send_s) for x in tasks)
        expected += 2 * max(2 * busiest, sum(x.seconds + x.send_s for x in tasks))
    assert est.total_s == pytest.approx(expected, rel=1e-12)
    assert tasks[0].send_s == pytest.approx(2 * 4 * 64 * 2 / DEFAULT_LINK_BW)  # K x (b, 1, C) fp16
    assert est.throughput > estimate(whole, hw, num_prompts=4 * pol.block_size).throughput


def test_throughput_counts_real_prompts_and_pays_for_padding():
    hw = gpu_machine()
    p = place(SPEC, policy(gbs=4, num_batches=2), hw)
    full, partial = estimate(p, hw, num_prompts=16), estimate(p, hw, num_prompts=9)
    assert (full.num_blocks, partial.num_blocks) == (2, 2)
    assert partial.total_s == pytest.approx(full.total_s)
    assert partial.throughput == pytest.approx(full.throughput * 9 / 16)


def test_partition_costs_balance_by_time():
    spec, hw = llama_spec(layers=6), gpu_machine()
    resident = partition_costs(place(spec, policy(), hw), hw)
    assert len(resident.layer_costs) == 6 and len(set(resident.layer_costs)) == 1 and resident.layer_costs[0] > 0
    # a resident lookup costs only the rows it writes, far less than a layer; the vocabulary matmul more
    assert 0 < resident.first_extra < resident.layer_costs[0] / 50 and resident.first_extra < resident.last_extra
    offloaded = partition_costs(place(spec, policy((0, 100, 100, 0, 100, 0)), hw), hw)
    assert offloaded.first_extra == pytest.approx(resident.first_extra)  # gathered by rows wherever it lives
    assert offloaded.layer_costs[0] > resident.layer_costs[0]
    ranges = partition_layers(offloaded.layer_costs, 3, first_extra=offloaded.first_extra,
                              last_extra=offloaded.last_extra)
    assert len(ranges) == 3 and sum(len(r) for r in ranges) == 6


def test_the_bound_of_a_step_is_its_larger_path():
    hw = gpu_machine()
    for percent in ((0, 0, 0, 0, 100, 0), (100, 0, 100, 0, 100, 0)):
        step = task_time(place(SPEC, policy(percent), hw), hw, 3)
        assert step.bound == ("load" if step.load_s > step.compute_s else "compute")
        assert step.seconds >= max(step.compute_s, step.load_s) - 1e-15


@pytest.mark.parametrize("module", ["cost_model", "cost_terms", "search", "lp", "fit", "place"])
def test_planner_imports_without_torch(module):
    code = f"import sys; sys.modules['torch'] = None; import flexgen_dist.planning.{module}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_all_combinations_price_without_error():
    hw = gpu_machine()
    for ccc, weight, cache in itertools.product([False, True], repeat=3):
        p = place(SPEC, policy((20, 30, 20, 30, 50, 25), cpu_cache_compute=ccc, compress_weight=weight,
                               compress_cache=cache), hw)
        est = estimate(p, hw)
        assert est.throughput > 0 and est.decode.work.matmul > 0


def test_a_gemm_of_more_rows_runs_at_a_higher_rate():
    """The profile's two GEMM rates (32 rows, many rows) price every batch: 64 rows cost less than
    twice 32 rows, 32 rows run at the decode rate, and many rows approach the prefill rate."""
    from flexgen_dist.planning.cost_terms import matmul_seconds

    sp = cpu_machine().speeds
    numel = 1 << 20
    assert 2 * 32 * numel / matmul_seconds(sp, 32, numel) == pytest.approx(sp.decode_matmul_flops, rel=1e-9)
    assert matmul_seconds(sp, 64, numel) < 2 * matmul_seconds(sp, 32, numel)
    assert 2 * 4096 * numel / matmul_seconds(sp, 4096, numel) > 0.95 * sp.matmul_flops
