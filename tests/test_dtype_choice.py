"""The compute dtype on the CPU is chosen by the planner from this machine's profile of each dtype
(16-bit matmuls are several times faster than fp32 on some CPUs and several times slower on
others), not assumed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexgen_dist import Runtime
from flexgen_dist.errors import UserError
from flexgen_dist.api import planner
from flexgen_dist.api.planner import Capacity, choose_dtype, plan_for
from flexgen_dist.planning.placement import Dtypes
from flexgen_dist.planning.search import SearchOptions
from planner_cases import cpu_machine, llama_spec

CPU = torch.device("cpu")
FP32, FP16 = Dtypes("float32", "float16"), Dtypes("float16", "float16")


def _fp16_spec():
    return dataclasses.replace(llama_spec(), dtype="float16")


def test_a_16_bit_checkpoint_on_the_cpu_may_compute_in_float32_or_its_own_dtype():
    # a float16 checkpoint computed in bfloat16 is stored rounded to bfloat16: nothing converted per step
    assert Runtime().dtype_choices(_fp16_spec(), CPU) == [FP32, FP16, Dtypes("bfloat16", "bfloat16")]
    bf16 = dataclasses.replace(llama_spec(), dtype="bfloat16")
    assert Runtime().dtype_choices(bf16, CPU) == [Dtypes("float32", "bfloat16"), Dtypes("bfloat16", "bfloat16")]
    assert Runtime().dtype_choices(dataclasses.replace(llama_spec(), dtype="float32"), CPU) == [Dtypes("float32", "float32")]
    assert Runtime(compute_dtype="bfloat16").dtype_choices(_fp16_spec(), CPU) == [Dtypes("bfloat16", "bfloat16")]
    kept = Runtime(compute_dtype="bfloat16", storage_dtype="float16")  # storage given: kept
    assert kept.dtype_choices(_fp16_spec(), CPU) == [Dtypes("bfloat16", "float16")]


def _machine_where(fp16_speedup: float, bf16_speedup: float):
    """The profile of each dtype: 16-bit compute that many times fp32's."""
    fp32 = cpu_machine(host_mem=2 << 30)
    s = fp32.speeds

    def scaled(dtype, factor):
        return dataclasses.replace(fp32, speeds=dataclasses.replace(s, compute_dtype=dtype, **{
            name: getattr(s, name) * factor for name in ("matmul_flops", "decode_matmul_flops", "attention_flops",
                                                          "decode_attention_flops", "cpu_attention_flops", "elementwise_bw")}))

    return {"float32": fp32, "float16": scaled("float16", fp16_speedup), "bfloat16": scaled("bfloat16", bf16_speedup)}


@pytest.mark.parametrize("fp16_speedup, bf16_speedup, chosen", [
    (4.0, 0.9, "float16"),  # AVX-512 FP16: the checkpoint's own dtype, nothing converted
    (0.25, 0.3, "float32"),  # AVX2 only: 16-bit matmuls are slow
    (0.25, 4.0, "bfloat16"),  # AVX-512 BF16 without FP16 (this development machine)
])
def test_the_planner_computes_in_the_dtype_its_profile_predicts_faster(monkeypatch, fp16_speedup, bf16_speedup, chosen):
    machines = _machine_where(fp16_speedup, bf16_speedup)
    asked = []

    def fake_hardware(capacity, *, compute_dtype, **kwargs):
        asked.append(compute_dtype)
        return machines[compute_dtype]

    monkeypatch.setattr(planner, "rank_hardware", fake_hardware)
    choice = plan_for(_fp16_spec(), runtime=Runtime(device="cpu"), policy=None, capacity=Capacity(),
                      options=SearchOptions(), offload_dir=None)
    assert sorted(asked) == ["bfloat16", "float16", "float32"]
    assert choice.placement.dtypes == Dtypes(chosen, "bfloat16" if chosen == "bfloat16" else "float16")
    assert f"compute {chosen}" in choice.log_line()
    others = [name for name in machines if name != chosen]
    assert all(f"{name} " in choice.log_line().split("against", 1)[1] for name in others)
    assert f"compute dtype: {chosen}" in choice.summary()
    assert ("rounds the float16 weights" in choice.log_line()) == (chosen == "bfloat16")


def _fake_plan(throughputs: dict, refused=()):
    def plan_in(dtypes):
        if dtypes.compute in refused:
            raise UserError(f"{dtypes.compute} does not fit")
        return planner.PlanChoice(placement=dataclasses.replace(_placement(), dtypes=dtypes), units=[],
                                  estimate=_estimate(throughputs[dtypes.compute]), hardware=None, searched=True)
    return plan_in


def _placement():
    from flexgen_dist.spec.layout import model_units
    from flexgen_dist.planning.place import plan_placement
    from flexgen_dist.planning.placement import Buffers, Workload
    from flexgen_dist.planning.policy import Policy

    spec = _fp16_spec()
    return plan_placement(spec, model_units(spec), Policy(), dtypes=FP32, workload=Workload(8, 4),
                          buffers=Buffers(separate_gpu=False))


def _estimate(throughput):
    class Estimate:  # only the throughput is read
        pass
    est = Estimate()
    est.throughput = throughput
    return est


def test_a_dtype_whose_plan_does_not_fit_loses_and_none_fitting_is_the_first_error():
    choice = choose_dtype([FP32, FP16], _fake_plan({"float16": 5.0}, refused=("float32",)))
    assert choice.placement.dtypes == FP16 and "float32 does not fit" in choice.dtype_note
    with pytest.raises(UserError, match="float32 does not fit"):
        choose_dtype([FP32, FP16], _fake_plan({}, refused=("float32", "float16")))


def test_the_ranks_of_a_pipeline_choose_one_dtype_by_their_slowest_rank():
    class TwoRanks:  # this rank predicts fp16 faster; the other predicts it much slower
        def gather(self, mine):
            return [mine, {"float32": 9.0, "float16": 2.0}]

    choice = choose_dtype([FP32, FP16], _fake_plan({"float32": 8.0, "float16": 12.0}), pipeline=TwoRanks())
    assert choice.placement.dtypes == FP32
