"""Gemma 3 (gemma3_text, transformers' Gemma3ForCausalLM): greedy tokens and log-probabilities
equal transformers' (greedy in memory, partly and wholly on disk: tests/test_families_2026.py;
through continuous refill: tests/test_refill.py); the
planned bytes equal the allocated ones; the published configs of Gemma 3 1B and 4B (its text
model) lay out transformers' tensors and plan; fields left out take transformers' defaults and
what is not implemented is refused in one line.

Tiny random checkpoints (tests/tiny_models.py ARCHS_GEMMA3), fp32 on the CPU: six layers, four
local (a window of 6, shorter than every test sequence, and a rope base of 100) and two global
(rope base 10000), a softmax scale not head_dim's; the second with linear rope scaling on the
global layers, its final logits softcapped and its head untied.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import tiny_models
from conftest import hf_greedy, hf_model, hf_trace, unambiguous_prompts
from flexgen_dist import LLM, Policy, Runtime
from flexgen_dist.errors import UserError
from flexgen_dist.spec.model import ModelSpec
from planner_cases import GiB, assert_plans_on_a_gpu_box_and_a_cpu_box, layout_tensors
from test_families_2026 import _ON_DEVICE
from test_placement import EVERY_TIER
from test_placement import test_planned_bytes_equal_allocated_bytes as planned_bytes_equal_allocated_bytes

ARCHS = tiny_models.ARCHS_GEMMA3


@pytest.fixture(scope="session")
def gemma3_dir(tiny_models_cache):
    return tiny_models_cache["gemma3"]


# --- log-probabilities: the softcap and every position's logits -------------------------------------


@pytest.mark.parametrize("through_cache", [False, True], ids=["prefill", "through-cache"])
@pytest.mark.parametrize("arch", ARCHS)
def test_scores_match_transformers_log_probabilities(arch, through_cache, tiny_models_cache, tmp_path):
    """Every prompt position's log-probability of the next token equals transformers' (the
    softcap changes them, not the greedy choices), in one prefill and one decode step at a time."""
    model_dir = tiny_models_cache[arch]
    prompts = tiny_models.random_prompts((16, 9, 12), seed=3)
    policy = Policy(**_ON_DEVICE, gpu_batch_size=3, num_gpu_batches=1)
    with LLM(str(model_dir), policy=policy, offload_dir=str(tmp_path), runtime=Runtime(device="cpu")) as llm:
        scores = llm.score(prompts, through_cache=through_cache)
    model = hf_model(str(model_dir))
    for prompt, got in zip(prompts, scores):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()  # (T - 1, V)
        want = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(got), want, atol=2e-4, rtol=0)


# --- the features the tiny checkpoints exercise ----------------------------------------------------


def _edited_copy(src, dst, edit) -> str:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return str(dst)


def _set(*path_and_value):
    *path, key, value = path_and_value

    def edit(config):
        node = config
        for part in path:
            node = node[part]
        node[key] = value
    return edit


FEATURES = {
    # arch, what is changed in its config.json
    "window": ("gemma3", _set("sliding_window", 64)),
    "local-rope-theta": ("gemma3", _set("rope_parameters", "sliding_attention", "rope_theta", 10000.0)),
    "global-rope-theta": ("gemma3", _set("rope_parameters", "full_attention", "rope_theta", 100.0)),
    "layer-types": ("gemma3", _set("layer_types", ["sliding_attention"] * 6)),
    "attention-scale": ("gemma3", _set("query_pre_attn_scalar", 16)),
    "linear-factor": ("gemma3-linear-softcap", _set("rope_parameters", "full_attention", "factor", 1.0)),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_window_and_rope_settings_are_exercised(feature, tiny_models_cache, tmp_path):
    """transformers' references change when the window, either rope base, which layers are
    local, the softmax scale or the linear rope factor change: an engine that ignored one would
    fail the tests above."""
    arch, edit = FEATURES[feature]
    model_dir = tiny_models_cache[arch]
    spec = ModelSpec.from_dir(model_dir)
    assert (spec.local_window, spec.local_layers, spec.local_rope_theta, spec.rope_theta) == (6, (0, 1, 3, 5),
                                                                                              100.0, 10000.0)
    other = _edited_copy(model_dir, tmp_path / "edited", edit)
    assert ModelSpec.from_dir(other) != spec
    prompts = unambiguous_prompts(model_dir, (16, 20, 12), 10, seed=5)
    changed = sum(hf_trace(other, p, 10)[0] != hf_greedy(model_dir, p, 10) for p in prompts)
    assert changed >= 2, f"only {changed} of 3 references depend on {feature}"


# --- placement: planned bytes are allocated bytes -------------------------------------------------


@pytest.mark.parametrize("policy", [EVERY_TIER, EVERY_TIER.replace(compress_weight=True, compress_cache=True)],
                         ids=["every-tier", "compressed"])
def test_planned_bytes_equal_allocated_bytes(request, tiny_models_cache, tmp_path, monkeypatch, policy):
    """tests/test_placement.py's check on Gemma 3's tensors (four norms a layer, q/k norms, a tied head)."""
    planned_bytes_equal_allocated_bytes(request, tiny_models_cache, tmp_path, monkeypatch, "gemma3", policy)


# --- published configs --------------------------------------------------------------------------

# google/gemma-3-1b-it's config.json, as written there.
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}
# The text_config of google/gemma-3-4b-it's config.json, as written there: the heads, head_dim,
# the vocabulary and the rope bases are Gemma3TextConfig's defaults.
GEMMA3_4B_TEXT = {
    "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
}
# name: (config, parameters of transformers' model of it: 1B's as published; 4B's without the vision tower)
PUBLISHED = {
    "gemma-3-1b-it": (GEMMA3_1B, 999_885_952),
    "gemma-3-4b-it-text": (GEMMA3_4B_TEXT, 3_880_263_168),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_lays_out_transformers_tensors(name):
    """The units hold exactly the tensors transformers builds from the config (on the meta
    device: no memory, no download), with their shapes and parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config, params = PUBLISHED[name]
    spec = ModelSpec.from_config(config)
    tensors = layout_tensors(spec)
    assert sum(torch.Size(shape).numel() for shape in tensors.values()) == params
    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    hf = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    assert spec.tie_word_embeddings
    hf.pop("lm_head.weight")  # tied: transformers' lm_head is the embedding table
    assert tensors == hf
    _assert_as_transformers(spec, hf_config)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_plans_on_a_gpu_box_and_a_cpu_box(name):
    spec = ModelSpec.from_config(PUBLISHED[name][0])
    numel = sum(torch.Size(shape).numel() for shape in layout_tensors(spec).values())
    assert_plans_on_a_gpu_box_and_a_cpu_box(spec, numel, gpu_mem=16 * GiB, cpu_mem=32 * GiB, host_mem=16 * GiB)


def test_published_shapes_read_from_the_configs():
    one, four = (ModelSpec.from_config(PUBLISHED[n][0]) for n in PUBLISHED)
    assert (one.family, one.num_layers, one.hidden_size, one.num_heads, one.num_kv_heads, one.head_dim) == (
        "gemma3", 26, 1152, 4, 1, 256)
    assert (one.intermediate_size, one.vocab_size, one.max_positions, one.eos_token_ids) == (
        6912, 262144, 32768, (1, 106))
    assert (one.sliding_window, one.local_window, one.rope_theta, one.local_rope_theta) == (None, 512, 1e6, 1e4)
    assert one.local_layers == tuple(i for i in range(26) if (i + 1) % 6) and one.attention_scale == 1 / 16
    assert (one.rope_scaling, one.local_rope_scaling, one.final_logit_softcapping) == (None, None, None)
    assert (four.num_layers, four.hidden_size, four.num_heads, four.num_kv_heads, four.head_dim) == (
        34, 2560, 8, 4, 256)
    assert (four.intermediate_size, four.vocab_size, four.local_window, four.max_positions) == (
        10240, 262208, 1024, 131072)
    assert four.rope_scaling == {"rope_type": "linear", "factor": 8.0} and four.local_rope_scaling is None
    assert (four.rope_theta, four.local_rope_theta, four.local_layers[:6]) == (1e6, 1e4, (0, 1, 2, 3, 4, 6))


# --- defaults and refusals -------------------------------------------------------------------------


def _assert_as_transformers(spec: ModelSpec, hf) -> None:
    """The spec holds what transformers' config of the same config.json computes with."""
    rope = hf.rope_parameters
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
        hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert (spec.intermediate_size, spec.vocab_size, spec.max_positions, spec.norm_eps) == (
        hf.intermediate_size, hf.vocab_size, hf.max_position_embeddings, hf.rms_norm_eps)
    assert spec.local_layers == tuple(i for i, kind in enumerate(hf.layer_types) if kind == "sliding_attention")
    assert spec.local_window == (hf.sliding_window if spec.local_layers else None)
    assert (spec.attention_scale, spec.final_logit_softcapping) == (hf.query_pre_attn_scalar ** -0.5,
                                                                    hf.final_logit_softcapping)
    assert spec.tie_word_embeddings == hf.tie_word_embeddings
    for kind, theta, scaling in (("full_attention", spec.rope_theta, spec.rope_scaling),
                                 ("sliding_attention", spec.local_rope_theta, spec.local_rope_scaling)):
        assert theta == rope[kind]["rope_theta"]
        assert (scaling or {"rope_type": "default"}) == {k: v for k, v in rope[kind].items() if k != "rope_theta"}


@pytest.mark.parametrize("config", [
    {},  # every field transformers' default
    dict(rope_theta=5e5, rope_local_base_freq=2e4, sliding_window_pattern=3, num_hidden_layers=7),  # 4.x names
    dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=2e5, sliding_window=16),
    dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0}}, rope_local_base_freq=500),
    dict(layer_types=["full_attention"] * 2, num_hidden_layers=2, final_logit_softcapping=30.0),
    dict(tie_word_embeddings=False, query_pre_attn_scalar=168, num_key_value_heads=8, head_dim=128),
], ids=["empty", "pattern-and-bases", "rope-scaling", "partial-rope-parameters", "all-global", "27b-like"])
def test_fields_left_out_take_transformers_defaults(config):
    """A config.json that leaves fields out gets the values Gemma3TextConfig gives them: its
    shapes, the window pattern of 6, rope bases 1e6 (global) and 1e4 (local), a rope_scaling on
    the global layers only."""
    from transformers import AutoConfig

    config = dict(config, model_type="gemma3_text")
    spec = ModelSpec.from_config(config)
    _assert_as_transformers(spec, AutoConfig.for_model(**json.loads(json.dumps(config))))


def _write_config(tmp_path, config) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


REFUSED = {
    # name: (change to Gemma 3 1B's config.json, the key the message names, words it says)
    "multimodal": (dict(model_type="gemma3"), "model_type", "gemma3_text"),
    "attention-softcap": (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping", "not implemented"),
    "bidirectional": (dict(use_bidirectional_attention=True), "use_bidirectional_attention", "not supported"),
    "activation": (dict(hidden_activation="gelu"), "hidden_activation", "gelu_pytorch_tanh"),
    "legacy-type": (dict(rope_scaling={"type": "linear", "factor": 8.0}), "rope_type", "default"),
    "yarn": (dict(rope_scaling={"rope_type": "yarn", "factor": 8.0}), "yarn", "supported: default, linear"),
    "layer-types": (dict(layer_types=["full_attention"] * 3), "layer_types", "26 entries"),
    "no-window": (dict(sliding_window=None), "sliding_window", "positive integer"),
    "flat-rope-parameters": (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}), "rope_parameters",
                             "sliding_attention"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_settings_are_refused_in_one_line(name, tmp_path):
    change, key, words = REFUSED[name]
    with pytest.raises(UserError) as err:
        ModelSpec.from_dir(_write_config(tmp_path, dict(GEMMA3_1B, **change)))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "config.json") in message
    assert key in message and words in message, message
