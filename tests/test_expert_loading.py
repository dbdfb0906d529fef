"""Mixtures of experts with experts off the compute device (issue 23, item 2): a decode step
loads only the experts its rows chose (storage/weights.py `OnDemand`), each once for all the
block's rows, and gives transformers' tokens; the prefill loads every expert with its layer; the
cost model prices a decode step's expert loads at the expected share chosen, on the compute path.

Tiny random checkpoints of tests/tiny_models.py, fp32 on the CPU: Mixtral with 8 experts, 2 per
token; Qwen3-MoE with 8 experts, 3 per token.
"""

from __future__ import annotations

import pytest

from conftest import hf_greedy, unambiguous_prompts
from flexgen_dist import LLM, Policy, Runtime
from flexgen_dist.planning.cost_terms import chosen_share, weight_work
from flexgen_dist.spec.layout import UnitKind, model_units
from flexgen_dist.spec.model import ModelSpec
from planner_cases import cpu_machine, gpu_machine, place, policy

_MEMORY = dict(cache_gpu_percent=100, cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0)
ON_HOST = Policy(w_gpu_percent=0, w_cpu_percent=100, gpu_batch_size=1, num_gpu_batches=1, **_MEMORY)
ON_DISK = Policy(w_gpu_percent=0, w_cpu_percent=0, gpu_batch_size=2, num_gpu_batches=2, **_MEMORY)
TOP_K = {"mixtral": 2, "qwen3-moe": 3}


def _run(model_dir, prompts, policy: Policy, new: int, offload_dir, on_demand: bool = True):
    policy = policy.replace(experts_on_demand=on_demand)
    with LLM(str(model_dir), policy=policy, offload_dir=str(offload_dir), runtime=Runtime(device="cpu", refill=False)) as llm:
        result = llm.generate(prompts, max_new_tokens=new, do_sample=False, ignore_eos=True)
        return [list(out.output_ids) for out in result.outputs], llm.weights.counts


@pytest.mark.parametrize("arch", ["mixtral", "qwen3-moe"])
def test_a_one_row_decode_step_loads_the_top_k_experts_of_each_layer(arch, tiny_models_cache, tmp_path, caplog):
    """One row: each decode step's router picks exactly top_k of the 8 experts in every sparse
    layer, so exactly top_k / 8 of the expert tensors offered are copied (and the log says so,
    beside the cost model's share); the tokens are transformers', and those of loading every
    expert; less is read than with every expert."""
    model_dir = tiny_models_cache[arch]
    prompts = unambiguous_prompts(model_dir, [7], 6, seed=3)
    with caplog.at_level("INFO", logger="flexgen_dist.api.llm"):
        tokens, counts = _run(model_dir, prompts, ON_HOST, 6, tmp_path / "a")
    assert tokens == [hf_greedy(model_dir, prompts[0], 6)]
    assert counts.experts_offered > 0
    assert counts.experts_loaded * 8 == counts.experts_offered * TOP_K[arch]
    share = f"{100 * TOP_K[arch] / 8:.0f}%"
    assert f"decode steps loaded {share} of the experts they could (the plan assumed {share} for blocks of 1)" \
        in caplog.text
    every, all_counts = _run(model_dir, prompts, ON_HOST, 6, tmp_path / "b", on_demand=False)
    assert every == tokens
    assert all_counts.experts_offered == 0 and all_counts.expert_nbytes == 0
    assert all_counts.loads == counts.loads
    per_expert = counts.expert_nbytes // counts.experts_loaded
    assert all_counts.nbytes - counts.nbytes == per_expert * (counts.experts_offered - counts.experts_loaded)


def test_experts_on_disk_load_on_demand_for_blocks_of_rows(tiny_models_cache, tmp_path):
    """Weights on disk, blocks of 2 x 2 rows: tokens equal transformers', and a step copies each
    chosen expert once for the block (at most every expert, at least top_k)."""
    model_dir = tiny_models_cache["mixtral"]
    prompts = unambiguous_prompts(model_dir, [5, 9, 4, 7, 6], 5, seed=8)
    tokens, counts = _run(model_dir, prompts, ON_DISK, 5, tmp_path)
    assert tokens == [hf_greedy(model_dir, p, 5) for p in prompts]
    offered, loaded = counts.experts_offered, counts.experts_loaded
    assert offered * 2 / 8 <= loaded < offered


def test_cost_model_prices_a_decode_steps_experts_at_the_chosen_share():
    """By hand: in the prefill the experts load with their layer (loader path); in a decode step
    the expected share chosen by the block's rows, on the compute path; other weights alike."""
    spec = ModelSpec.from_config(dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=256,
                                      max_position_embeddings=128, model_type="mixtral", num_local_experts=8,
                                      num_experts_per_tok=2))
    hw = gpu_machine()
    layer = next(u for u in model_units(spec) if u.kind is UnitKind.BLOCK).layer_idx
    for gbs, batches in ((1, 1), (4, 2)):
        p = place(spec, policy((0, 100, 100, 0, 100, 0), gbs=gbs, num_batches=batches), hw)
        assert sum(w.expert for w in p.weights[layer]) == 8 * 3
        prefill, decode = weight_work(p, hw.speeds, layer, 0), weight_work(p, hw.speeds, layer, 3)
        assert prefill.on_demand == 0
        dense = decode.weight_link + decode.weight_disk + decode.codec  # loaded ahead with the layer
        experts = prefill.weight_link + prefill.weight_disk + prefill.codec - dense
        assert experts > dense > 0
        share = chosen_share(8, 2, gbs * batches)
        assert share == pytest.approx(1 - 0.75 ** (gbs * batches)) and share < 1
        assert decode.on_demand == pytest.approx(share * experts)
        assert decode.load_path(True) == pytest.approx(decode.weight_link + decode.weight_disk)
        assert decode.compute_path(True) == pytest.approx(decode.codec + decode.on_demand)


def test_the_planner_weighs_loading_the_chosen_experts_against_loading_all_ahead():
    """On demand moves fewer bytes but on the compute path; ahead moves them all, overlapped. With
    experts on disk of a CPU box (compute and reads of one order), a one-row block's decode task
    is faster on demand (a quarter of the experts) and a 128-row block's ahead (every expert is
    chosen anyway: its reads hide behind the compute): the cost model says so, and the search
    tries both ways for a mixture of experts (only there)."""
    from flexgen_dist.planning.cost_model import task_time
    from flexgen_dist.planning.placement import Dtypes
    from flexgen_dist.planning.search import SearchOptions, switch_sets

    spec = ModelSpec.from_config(dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=256,
                                      max_position_embeddings=128, model_type="mixtral", num_local_experts=8,
                                      num_experts_per_tok=2))
    hw = cpu_machine()
    faster = {}
    for rows in (1, 128):
        seconds = {}
        for on_demand in (True, False):
            pol = policy((0, 0, 100, 0, 100, 0), gbs=rows, num_batches=1, experts_on_demand=on_demand)
            seconds[on_demand] = task_time(place(spec, pol, hw), hw, 5).seconds
        faster[rows] = min(seconds, key=seconds.get)
    assert faster == {1: True, 128: False}
    fp16 = Dtypes("float16", "float16")
    base = Policy()
    assert {p.experts_on_demand for p in switch_sets(base, SearchOptions(), hw, fp16, experts=True)} == {True, False}
    assert {p.experts_on_demand for p in switch_sets(base, SearchOptions(), hw, fp16)} == {True}
    assert {p.experts_on_demand for p in switch_sets(base.replace(experts_on_demand=False), SearchOptions(), hw, fp16,
                                                     experts=True)} == {False}  # --experts-ahead: as given


def test_weight_compression_keeps_the_router_exact(tiny_models_cache, tmp_path):
    """Under --compress-weight the experts are quantized and the router is not (a rounded router
    score can send a token to another expert). Planned bytes equal allocated ones with it
    (tests/test_moe.py), and the tokens stay within the compression tolerances
    (tests/test_families_ranks.py)."""
    spec = ModelSpec.from_dir(tiny_models_cache["mixtral"])
    p = place(spec, policy((100, 0, 100, 0, 100, 0), gbs=1, num_batches=1, compress_weight=True), cpu_machine())
    layer = next(u for u in model_units(spec) if u.kind is UnitKind.BLOCK).layer_idx
    compressed = {w.name: w.compressed for w in p.weights[layer]}
    assert compressed["mlp.gate.weight"] is False
    assert all(compressed[f"mlp.experts.{e}.{proj}.weight"] for e in range(8) for proj in ("gate_proj", "down_proj"))
