"""The profile measures what the engine does (reads of the pieces a plan reads, conversion into
reused buffers) and is measured again when the machine under a host name changes; the cost
model prices each read call and each conversion from it."""

from __future__ import annotations

import dataclasses

from flexgen_dist import profile
from flexgen_dist.planning import cost_terms
from flexgen_dist.machine.hardware import Hardware
from planner_cases import cpu_machine, llama_spec, policy, settings
from flexgen_dist.spec.layout import model_units
from flexgen_dist.planning.place import plan_placement

MiB = 1 << 20


def _placement(hardware, percent=(100, 0, 100, 0, 100, 0)):
    spec = llama_spec()
    return plan_placement(spec, model_units(spec), policy(percent), **settings(hardware))


def test_each_read_call_costs_the_profiled_latency():
    hw = cpu_machine()
    speeds = dataclasses.replace(hw.speeds, disk_read_bw=1e9, disk_read_latency=1e-4)
    p = _placement(hw)
    chunk = p.buffers.chunk_bytes
    assert cost_terms.disk_read_seconds(p, speeds, 64 << 10) == (64 << 10) / 1e9 + 1e-4
    assert cost_terms.disk_read_seconds(p, speeds, 2 * chunk + 1) == (2 * chunk + 1) / 1e9 + 3e-4
    assert cost_terms.disk_read_seconds(p, dataclasses.replace(speeds, disk_read_latency=0.0), 64 << 10) == (64 << 10) / 1e9


def test_a_kv_cache_on_disk_pays_per_piece():
    """Decode with the cache on disk: many small per-(layer, batch) reads, each paying the latency."""
    hw = cpu_machine()
    p = _placement(hw, percent=(100, 0, 0, 0, 100, 0))
    slow = dataclasses.replace(hw.speeds, disk_read_latency=1e-3)
    fast = dataclasses.replace(hw.speeds, disk_read_latency=0.0)
    layer = next(i for i, _ in p.caches)
    with_latency = cost_terms.cache_work(p, slow, layer, token_idx=3).cache_disk
    without = cost_terms.cache_work(p, fast, layer, token_idx=3).cache_disk
    reads = 2 * p.policy.num_gpu_batches  # k and v of each GPU batch
    assert with_latency - without == reads * 1e-3


def test_a_conversion_is_priced_at_the_profiled_conversion_rate():
    speeds = dataclasses.replace(cpu_machine().speeds, h2d_bw=8e9, convert_bw=2e9)
    assert cost_terms.host_copy_seconds(speeds, 2 * MiB, 4 * MiB) == 4 * MiB / 2e9  # fp16 -> fp32
    assert cost_terms.host_copy_seconds(speeds, 4 * MiB, 4 * MiB) == 4 * MiB / 8e9  # a plain copy
    unmeasured = dataclasses.replace(speeds, convert_bw=0.0)
    assert cost_terms.host_copy_seconds(unmeasured, 2 * MiB, 4 * MiB) == 3 * MiB / 8e9


def test_the_new_speeds_survive_a_json_round_trip(tmp_path):
    hw = cpu_machine()
    hw = dataclasses.replace(hw, speeds=dataclasses.replace(hw.speeds, disk_read_latency=2.5e-4, convert_bw=3e9))
    hw.save(tmp_path / "hw.json")
    back = Hardware.load(tmp_path / "hw.json")
    assert back.speeds.disk_read_latency == 2.5e-4 and back.speeds.convert_bw == 3e9


CPUINFO = "model name\t: {model}\nflags\t\t: fpu sse2 avx2 {extra}\n"


def test_the_profile_is_keyed_by_the_machine_not_only_its_host_name(monkeypatch):
    amd = profile.machine_key(CPUINFO.format(model="AMD EPYC", extra="avx512f avx512_bf16"))
    assert amd == profile.machine_key(CPUINFO.format(model="AMD EPYC", extra="avx512f avx512_bf16 sse4_2"))
    assert amd != profile.machine_key(CPUINFO.format(model="AMD EPYC", extra="avx512f"))  # no bf16 units
    assert amd != profile.machine_key(CPUINFO.format(model="Intel Xeon", extra="avx512f avx512_bf16"))
    import torch
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert amd != profile.machine_key(CPUINFO.format(model="AMD EPYC", extra="avx512f avx512_bf16"))
    assert profile.machine_key() in profile.cache_path("cpu", "float32", "/tmp").name


def test_a_streamed_head_rereads_its_other_chunks_for_every_gpu_batch():
    """A head larger than a slot: the loader brings one chunk; each GPU batch reads the other
    chunks on the compute path (none of that overlaps compute)."""
    from flexgen_dist.planning.placement import Tier, WeightPlace

    hw = cpu_machine()
    p = _placement(hw, percent=(0, 0, 100, 0, 100, 0))  # 2 GPU batches, weights on disk
    head = WeightPlace(layer_idx=5, name="lm_head.weight", shape=(3000, 128), tier=Tier.DISK, nbytes=3000 * 128 * 2)
    whole = cost_terms.weight_place_work(p, hw.speeds, head)
    streamed = cost_terms.weight_place_work(p, hw.speeds, dataclasses.replace(head, chunk_rows=1000))
    one_chunk = cost_terms.weight_place_work(p, hw.speeds, dataclasses.replace(head, shape=(1000, 128), nbytes=1000 * 128 * 2))
    assert streamed.weight_disk == one_chunk.weight_disk < whole.weight_disk
    per_chunk = one_chunk.weight_disk + one_chunk.weight_link
    assert streamed.streamed == 2 * p.policy.num_gpu_batches * per_chunk
    assert streamed.compute_path(False) > one_chunk.compute_path(False)
