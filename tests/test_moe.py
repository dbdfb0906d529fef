"""Mixtral and Qwen3-MoE (issue 23, item 2, first step): routed experts give transformers' greedy
tokens, their tensors are laid out and placed exactly, the published configs load, lay out and
plan, and what is not implemented is refused in one line.

Tiny random checkpoints (tests/tiny_models.py ARCHS_MOE) built from the transformers config
classes and saved with save_pretrained (per-expert tensors, as the published checkpoints hold
them), fp32 on the CPU: Mixtral with 8 experts, 2 per token; Qwen3-MoE with 8 experts, 3 per token,
renormalised (norm_topk_prob); and Qwen3-MoE with a dense first layer (mlp_only_layers) and 4
experts, 2 per token, not renormalised.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import tiny_models
from conftest import hf_greedy, hf_trace, unambiguous_prompts
from flexgen_dist.errors import UserError
from flexgen_dist.spec.layout import UnitKind, model_units
from flexgen_dist.spec.model import ModelSpec
from planner_cases import GiB, assert_plans_on_a_gpu_box_and_a_cpu_box, gpu_machine, layout_tensors, place, policy
from test_families_2026 import SETUPS, _generate
from test_placement import EVERY_TIER
from test_placement import test_planned_bytes_equal_allocated_bytes as planned_bytes_equal_allocated_bytes

ARCHS = tiny_models.ARCHS_MOE


def _routed_experts(model_dir, prompts) -> list[torch.Tensor]:
    """Per sparse layer of the transformers model, how many tokens of `prompts` chose each expert."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    counts = [torch.zeros(r.num_experts, dtype=torch.long) for r in routers]

    def counter(c):
        def hook(module, args, out):  # out: router logits, top-k weights, top-k indices
            c.add_(torch.bincount(out[2].reshape(-1), minlength=len(c)))
        return hook

    hooks = [r.register_forward_hook(counter(c)) for r, c in zip(routers, counts)]
    with torch.no_grad():
        for p in prompts:
            model(torch.tensor([p]))
    for hook in hooks:
        hook.remove()
    return counts


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_is_a_good_test_subject(arch, tiny_models_cache):
    """transformers only: clear greedy choices, continuations that vary and depend on the first
    prompt token (the KV cache matters), and routing that uses every expert of every sparse layer,
    none for more than half of the choices: an engine that mixed up experts would fail above."""
    model_dir = tiny_models_cache[arch]
    n, length = 12, 12
    prompts = unambiguous_prompts(model_dir, [length] * 4, n, seed=21)
    distinct = sorted(len(set(hf_greedy(model_dir, p, n))) for p in prompts)
    assert distinct[0] >= 2 and distinct[len(distinct) // 2] >= 4, distinct
    free = tiny_models.VOCAB_SIZE - tiny_models.FIRST_FREE_ID
    changed = sum(hf_trace(model_dir, [tiny_models.FIRST_FREE_ID + (p[0] + 50) % free] + p[1:], n)[0]
                  != hf_greedy(model_dir, p, n) for p in prompts)
    assert changed >= 3, f"only {changed} of 4 continuations depend on the first prompt token"
    spec = ModelSpec.from_dir(model_dir)
    counts = _routed_experts(model_dir, prompts)
    assert len(counts) == len(spec.sparse_layers) >= 2
    for layer, count in zip(spec.sparse_layers, counts):
        assert (count > 0).all() and count.max() <= count.sum() // 2, (layer, count.tolist())


def _edited_copy(src, dst, edit) -> str:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return str(dst)


@pytest.mark.parametrize(("arch", "key", "value"), [
    ("qwen3-moe", "norm_topk_prob", False),
    ("qwen3-moe-dense-unnormed", "norm_topk_prob", True),
    ("mixtral", "num_experts_per_tok", 3),
    ("qwen3-moe", "num_experts_per_tok", 2),
], ids=["renormalised", "not-renormalised", "mixtral-top-k", "qwen3-moe-top-k"])
def test_routing_settings_are_exercised(arch, key, value, tiny_models_cache, tmp_path):
    """The references change when a routing setting is changed: an engine that renormalised
    where transformers does not (or not where it does), or took another number of experts per
    token, would fail the tests above."""
    model_dir = tiny_models_cache[arch]
    other = _edited_copy(model_dir, tmp_path / "edited", lambda config: config.update({key: value}))
    prompts = unambiguous_prompts(model_dir, (16, 20, 12), 10, seed=5)
    changed = sum(hf_trace(other, p, 10)[0] != hf_greedy(model_dir, p, 10) for p in prompts)
    assert changed >= 2, f"only {changed} of 3 references depend on {key}"


def _stacked_copy(src, dst) -> str:
    """The checkpoint `src` saved with its experts stacked, as transformers 5 holds them in memory
    (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, Mixtral's router as `mlp.gate`)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = {key: t.contiguous() for key, t in model.state_dict().items()}
    assert any(key.endswith("mlp.experts.gate_up_proj") for key in state)
    dst.mkdir()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    return str(dst)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3-moe-dense-unnormed"])
def test_experts_stored_stacked_load_too(arch, tiny_models_cache, tmp_path):
    """A checkpoint holding each layer's experts stacked (the format transformers 5 computes with,
    and loads) gives the same greedy tokens, its experts read from within the stacked tensors."""
    model_dir = tiny_models_cache[arch]
    stacked = _stacked_copy(model_dir, tmp_path / "stacked")
    setup = SETUPS["partly-on-disk"]
    prompts = unambiguous_prompts(model_dir, setup.lengths, setup.max_new_tokens, seed=4)
    result = _generate(stacked, prompts, setup.policy, setup.max_new_tokens, tmp_path / "offload")
    assert [list(out.output_ids) for out in result.outputs] == [
        hf_greedy(model_dir, p, setup.max_new_tokens) for p in prompts]
    assert [hf_trace(stacked, p, 6)[0] for p in prompts] == [hf_trace(model_dir, p, 6)[0] for p in prompts]


def test_stacked_experts_of_another_shape_are_refused(tiny_models_cache, tmp_path):
    model_dir = tiny_models_cache["qwen3-moe-dense-unnormed"]
    _stacked_copy(model_dir, tmp_path / "stacked")
    other = _edited_copy(tmp_path / "stacked", tmp_path / "other",
                         lambda config: config.update(num_local_experts=6))  # as transformers 5 saves it
    with pytest.raises(UserError) as err:
        _generate(other, [[5, 6, 7]], SETUPS["in-memory"].policy, 2, tmp_path / "offload")
    message = str(err.value)
    assert "\n" not in message and "mlp.experts.gate_up_proj' in" in message
    assert "has shape (4, 96, 64), config.json implies shape (6, 96, 64) (6 experts stacked)" in message


def test_experts_are_marked_in_the_layout(tiny_models_cache):
    """Each expert tensor names its expert (a later step places and loads experts one by one);
    the router, attention and norms, and a dense layer's MLP, belong to no expert."""
    spec = ModelSpec.from_dir(tiny_models_cache["qwen3-moe-dense-unnormed"])
    assert spec.sparse_layers == (1, 2) and spec.num_experts == 4
    blocks = [u for u in model_units(spec) if u.kind is UnitKind.BLOCK]
    assert all(ws.expert is None for ws in blocks[0].weights)
    for unit in blocks[1:]:
        experts = [ws for ws in unit.weights if ws.expert is not None]
        assert [ws.expert for ws in experts] == [e for e in range(4) for _ in range(3)]
        assert all(re.fullmatch(rf"mlp\.experts\.{ws.expert}\.(gate|up|down)_proj\.weight", ws.name) for ws in experts)
        assert {ws.name for ws in unit.weights if ws.expert is None} >= {"mlp.gate.weight", "self_attn.q_norm.weight"}


# --- placement: planned bytes are allocated bytes -------------------------------------------------


@pytest.fixture
def mixtral_dir(tiny_models_cache):
    return tiny_models_cache["mixtral"]


@pytest.fixture
def qwen3_moe_dir(tiny_models_cache):
    return tiny_models_cache["qwen3-moe-dense-unnormed"]  # a dense layer and sparse ones


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("policy", [EVERY_TIER, EVERY_TIER.replace(compress_weight=True, compress_cache=True)],
                         ids=["every-tier", "compressed"])
def test_planned_bytes_equal_allocated_bytes(request, tiny_models_cache, tmp_path, monkeypatch, arch, policy):
    """tests/test_placement.py's check (every weight, cache, activation file and working buffer
    measured on the real tensors and files of a run) on the routers' and experts' tensors."""
    planned_bytes_equal_allocated_bytes(request, tiny_models_cache, tmp_path, monkeypatch, arch, policy)


def test_cost_model_prices_the_experts_the_tokens_use():
    """A sparse layer's matmuls by hand: the dense ones (attention, router) as any GEMM; each
    expert streams its weights once if some token chose it (in expectation) and takes the rows
    routed to it, rows x top_k in all, not every row through every expert."""
    from flexgen_dist.planning.cost_terms import matmul_work

    spec = ModelSpec.from_config(dict(_MINIMAL, model_type="mixtral", num_local_experts=8, num_experts_per_tok=2))
    hw = gpu_machine()
    sp = hw.speeds
    block = next(u for u in model_units(spec) if u.kind is UnitKind.BLOCK)
    dense = sum(ws.numel for ws in block.weights if len(ws.shape) == 2 and ws.expert is None)
    per_expert = 3 * 128 * 64
    assert dense == 2 * 64 * 64 + 2 * 32 * 64 + 8 * 64
    peak = max(sp.matmul_flops, sp.decode_matmul_flops)
    fixed = 2 * 32 / sp.decode_matmul_flops - 2 * 32 / peak
    for gbs, token_idx, rows in ((3, 2, 3), (3, 0, 3 * 16)):  # a decode step, a prefill of 16
        p = place(spec, policy(gbs=gbs, num_batches=1), hw)
        chosen = 8 * (1 - (1 - 2 / 8) ** rows)
        by_hand = dense * (fixed + 2 * rows / peak) + per_expert * (chosen * fixed + 2 * rows * 2 / peak)
        assert matmul_work(p, sp, block, token_idx).matmul == pytest.approx(by_hand, rel=1e-12)
        assert chosen < 8


# --- published configs --------------------------------------------------------------------------

# config.json of the published checkpoints, as written there (auto_map and the like left out).
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
# name: (config, parameters as the model cards and safetensors indexes count them)
PUBLISHED = {
    "Mixtral-8x7B-v0.1": (MIXTRAL_8X7B, 46_702_792_704),
    "Qwen3-30B-A3B": (QWEN3_30B_A3B, 30_532_122_624),
}


def _as_transformers_holds_them(tensors: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The checkpoint's per-expert tensors as transformers 5 holds them in memory: each layer's
    experts stacked into `mlp.experts.gate_up_proj` (E, 2I, C) and `mlp.experts.down_proj`
    (E, C, I), Mixtral's `block_sparse_moe` named `mlp` (its conversion mapping)."""
    out, experts = {}, {}  # (layer prefix) -> {projection: [shapes]}
    for key, shape in tensors.items():
        key = key.replace(".block_sparse_moe.", ".mlp.")
        found = re.fullmatch(r"(.*\.mlp\.experts)\.\d+\.(\w+)\.weight", key)
        if found is None:
            out[key] = shape
            continue
        proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(found.group(2), found.group(2))
        experts.setdefault(found.group(1), {}).setdefault(proj, []).append(shape)
    for prefix, projs in experts.items():
        (gate, *_), (up, *_), (down, *_) = projs["gate_proj"], projs["up_proj"], projs["down_proj"]
        assert len({len(shapes) for shapes in projs.values()}) == 1 and gate == up
        count = len(projs["gate_proj"])
        out[prefix + ".gate_up_proj"] = (count, gate[0] + up[0], gate[1])
        out[prefix + ".down_proj"] = (count, *down)
    return out


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_lays_out_transformers_tensors(name):
    """The units hold exactly the tensors transformers builds from the config (on the meta
    device: no memory, no download), stacked as it stacks the experts, and the published
    parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config, params = PUBLISHED[name]
    spec = ModelSpec.from_config(config)
    tensors = layout_tensors(spec)
    assert sum(torch.Size(shape).numel() for shape in tensors.values()) == params
    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    hf = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    assert sum(torch.Size(shape).numel() for shape in hf.values()) == params
    assert _as_transformers_holds_them(tensors) == hf


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_plans_on_a_gpu_box_and_a_cpu_box(name):
    spec = ModelSpec.from_config(PUBLISHED[name][0])
    numel = sum(torch.Size(shape).numel() for shape in layout_tensors(spec).values())
    assert_plans_on_a_gpu_box_and_a_cpu_box(spec, numel, gpu_mem=24 * GiB, cpu_mem=64 * GiB, host_mem=32 * GiB)


def test_published_shapes_read_from_the_configs():
    mixtral, qwen = (ModelSpec.from_config(PUBLISHED[n][0]) for n in PUBLISHED)
    assert (mixtral.family, mixtral.num_layers, mixtral.hidden_size, mixtral.num_heads, mixtral.num_kv_heads,
            mixtral.head_dim, mixtral.vocab_size) == ("mixtral", 32, 4096, 32, 8, 128, 32000)
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_intermediate_size,
            mixtral.norm_topk_prob, mixtral.sparse_layers) == (8, 2, 14336, True, tuple(range(32)))
    assert (mixtral.rope_theta, mixtral.norm_eps, mixtral.sliding_window, mixtral.attention_bias) == (
        1e6, 1e-5, None, False)
    assert (qwen.family, qwen.num_layers, qwen.hidden_size, qwen.num_heads, qwen.num_kv_heads, qwen.head_dim,
            qwen.vocab_size) == ("qwen3_moe", 48, 2048, 32, 4, 128, 151936)
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size, qwen.norm_topk_prob,
            qwen.sparse_layers) == (128, 8, 768, True, tuple(range(48)))
    assert (qwen.mlp_width, qwen.sliding_window, qwen.rope_theta, qwen.eos_token_ids) == (768, None, 1e6, (151645,))


# --- settings read as transformers reads them ------------------------------------------------------

_MINIMAL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                num_hidden_layers=4, vocab_size=320)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_fields_left_out_take_transformers_defaults(model_type):
    """A config.json without the expert, norm, rope or window settings gets the values
    transformers' config class gives (Mixtral: rope_theta 1e6, eps 1e-5; Qwen3-MoE: head_dim
    hidden_size / heads, 128 experts of width 768, top-8, not renormalised)."""
    from transformers import AutoConfig

    config = dict(_MINIMAL, model_type=model_type)
    spec = ModelSpec.from_config(config)
    hf = AutoConfig.for_model(**config)
    assert spec.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert (spec.norm_eps, spec.max_positions, spec.sliding_window, spec.rope_theta) == (
        hf.rms_norm_eps, hf.max_position_embeddings, hf.sliding_window, hf.rope_parameters["rope_theta"])
    assert (spec.num_experts, spec.num_experts_per_tok) == (hf.num_local_experts, hf.num_experts_per_tok)
    if model_type == "qwen3_moe":
        assert (spec.moe_intermediate_size, spec.norm_topk_prob) == (hf.moe_intermediate_size, hf.norm_topk_prob)


@pytest.mark.parametrize("settings_", [
    dict(mlp_only_layers=[0, 2]),
    dict(decoder_sparse_step=2),
    dict(decoder_sparse_step=3, mlp_only_layers=[2]),
    dict(mlp_only_layers=[7]),  # no such layer: ignored, as by transformers
    dict(num_experts=0),  # every layer dense
    dict(use_sliding_window=True, sliding_window=8),
], ids=["mlp-only", "sparse-step-2", "step-3-and-mlp-only", "mlp-only-out-of-range", "no-experts", "window"])
def test_qwen3_moe_dense_and_sparse_layers_as_transformers_builds_them(settings_):
    """Which layers have experts (mlp_only_layers, decoder_sparse_step, num_experts 0), and the
    tensors of each, equal transformers' model on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(_MINIMAL, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    config.update(settings_)
    spec = ModelSpec.from_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    sparse = tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))
    assert spec.sparse_layers == sparse
    assert spec.sliding_window == model.config.sliding_window
    hf = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    assert _as_transformers_holds_them(layout_tensors(spec)) == hf


def test_expert_count_under_either_name():
    """Qwen3-MoE's published configs say num_experts, transformers 5 saves num_local_experts (its
    attribute map); Mixtral's say num_local_experts. Both names are read; two different values
    are refused."""
    for model_type in ("mixtral", "qwen3_moe"):
        for key in ("num_experts", "num_local_experts"):
            assert ModelSpec.from_config(dict(_MINIMAL, model_type=model_type, **{key: 16})).num_experts == 16
        assert ModelSpec.from_config(dict(_MINIMAL, model_type=model_type, num_experts=16,
                                          num_local_experts=16)).num_experts == 16
    with pytest.raises(UserError, match="both 'num_local_experts' 6 and 'num_experts' 5"):
        ModelSpec.from_config(dict(_MINIMAL, model_type="mixtral", num_experts=5, num_local_experts=6))


# --- refusals -------------------------------------------------------------------------------------


def _write_config(tmp_path, config) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize(("model_type", "key", "value", "fragment"), [
    ("qwen3_moe", "shared_expert_intermediate_size", 512, "a shared expert"),
    ("mixtral", "n_shared_experts", 2, "shared experts"),
    ("qwen3_moe", "scoring_func", "sigmoid", "a router scoring function"),
    ("mixtral", "topk_method", "noaux_tc", "a top-k routing method"),
    ("qwen3_moe", "routed_scaling_factor", 2.5, "a scale on the routing weights"),
    ("mixtral", "num_experts_per_tok", 9, "num_experts_per_tok 9 is more than the 8 experts"),
    ("qwen3_moe", "num_experts_per_tok", 0, "'num_experts_per_tok' is 0"),
    ("mixtral", "num_local_experts", 0, "'num_local_experts' is 0"),
    ("qwen3_moe", "mlp_only_layers", [0, "1"], "'mlp_only_layers' is [0, \"1\"]"),
    ("qwen3_moe", "decoder_sparse_step", 0, "'decoder_sparse_step' is 0"),
    ("qwen3_moe", "norm_topk_prob", "true", "'norm_topk_prob' is \"true\""),
    ("mixtral", "hidden_act", "gelu", "hidden_act 'gelu' is not supported for mixtral"),
])
def test_unimplemented_or_wrong_settings_are_refused_in_one_line(model_type, key, value, fragment, tmp_path):
    config = dict(_MINIMAL, model_type=model_type, num_experts=8, **{key: value})
    with pytest.raises(UserError) as err:
        ModelSpec.from_dir(_write_config(tmp_path, config))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "config.json") in message
    assert fragment in message, message
    if key != "hidden_act" and "more than" not in fragment:
        assert repr(key) in message


def test_settings_that_mean_none_are_accepted():
    """A shared-expert or router key at the value that means "none" (some configs write them)."""
    config = dict(_MINIMAL, model_type="qwen3_moe", shared_expert_intermediate_size=0, scoring_func="softmax",
                  routed_scaling_factor=1.0, router_jitter_noise=0.1, output_router_logits=True)
    assert ModelSpec.from_config(config).num_experts == 128


def test_unsupported_model_type_lists_the_mixtures_of_experts():
    with pytest.raises(UserError, match="supported: llama, mistral, opt, phi3, qwen2, qwen3 and the mixtures "
                                        "of experts mixtral, qwen3_moe"):
        ModelSpec.from_config({"model_type": "qwen2_moe"})
