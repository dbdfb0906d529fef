"""Qwen3 and Phi-3 (issue 23, item 1): greedy tokens equal transformers' `generate`, the planned
bytes equal the allocated ones, and the published configs load, lay out and plan.

Tiny random checkpoints (tests/tiny_models.py ARCHS_2026) built from the transformers config
classes, fp32 on the CPU: Qwen3 with its own head_dim and per-head q/k norms (untied; and tied with
attention biases), Phi-3 with its fused qkv_proj / gate_up_proj (plain; and with RoPE on half of
each head and a sliding window of 8, shorter than the test sequences).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import tiny_models
from conftest import hf_greedy, hf_trace, unambiguous_prompts
from flexgen_dist import LLM, Policy, Runtime
from flexgen_dist.errors import UserError
from flexgen_dist.spec.model import ModelSpec
from planner_cases import GiB, assert_plans_on_a_gpu_box_and_a_cpu_box, layout_tensors
from test_placement import EVERY_TIER
from test_placement import test_planned_bytes_equal_allocated_bytes as planned_bytes_equal_allocated_bytes

ARCHS = tiny_models.ARCHS_2026


@dataclasses.dataclass(frozen=True)
class Setup:
    policy: Policy
    lengths: tuple[int, ...]
    max_new_tokens: int


_ON_DEVICE = dict(w_gpu_percent=100, w_cpu_percent=0, cache_gpu_percent=100, cache_cpu_percent=0,
                  act_gpu_percent=100, act_cpu_percent=0)
SETUPS = {
    # Everything in memory, one GPU batch of prompts of lengths 3..20 (left padding).
    "in-memory": Setup(Policy(**_ON_DEVICE, gpu_batch_size=4, num_gpu_batches=1), (3, 20, 8, 12), 12),
    # Weights on all three tiers (30 / 30 / disk 40), the KV cache half on the host, half on disk.
    "partly-on-disk": Setup(Policy(**dict(_ON_DEVICE, w_gpu_percent=30, w_cpu_percent=30, cache_gpu_percent=0,
                                          cache_cpu_percent=50), gpu_batch_size=2, num_gpu_batches=2),
                            (6, 11, 4, 15), 12),
    # Weights, KV cache and activations all on disk; the last block not full.
    "all-on-disk": Setup(Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=0,
                                cache_gpu_percent=0, cache_cpu_percent=0, act_gpu_percent=0, act_cpu_percent=0),
                         (4, 16, 9), 10),
}
# every family added in 2026 (the mixtures of experts: tests/test_moe.py, Gemma 3: tests/test_gemma3.py)
GREEDY_ARCHS = ARCHS + tiny_models.ARCHS_MOE + tiny_models.ARCHS_GEMMA3
MATRIX = [(arch, name) for arch in GREEDY_ARCHS for name in SETUPS]


def _generate(model_dir, prompts, policy: Policy, max_new_tokens: int, offload_dir):
    with LLM(str(model_dir), policy=policy, offload_dir=str(offload_dir), runtime=Runtime(device="cpu")) as llm:
        return llm.generate(prompts, max_new_tokens=max_new_tokens, do_sample=False)


@pytest.mark.parametrize(("arch", "setup_name"), MATRIX, ids=[f"{a}-{s}" for a, s in MATRIX])
def test_greedy_matches_transformers(arch, setup_name, tiny_models_cache, tmp_path):
    setup = SETUPS[setup_name]
    model_dir = tiny_models_cache[arch]
    prompts = unambiguous_prompts(model_dir, setup.lengths, setup.max_new_tokens, seed=len(setup.lengths))
    result = _generate(model_dir, prompts, setup.policy, setup.max_new_tokens, tmp_path)
    mismatches = [f"prompt {i} (length {len(p)}): engine {list(out.output_ids)} != transformers {want}"
                  for i, (p, out) in enumerate(zip(prompts, result.outputs))
                  if list(out.output_ids) != (want := hf_greedy(model_dir, p, setup.max_new_tokens))]
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_is_a_good_test_subject(arch, tiny_models_cache):
    """transformers only: clear greedy choices, continuations that vary and depend on the
    oldest prompt token the last one attends to (the first; with a window of 8, the 8th from the
    end): the KV cache matters, as tests/test_equivalence.py asks of the older archs."""
    model_dir = tiny_models_cache[arch]
    n, length = 12, 12
    far = length - (ModelSpec.from_dir(model_dir).sliding_window or length)
    prompts = unambiguous_prompts(model_dir, [length] * 4, n, seed=21)
    distinct = sorted(len(set(hf_greedy(model_dir, p, n))) for p in prompts)
    assert distinct[0] >= 2 and distinct[len(distinct) // 2] >= 4, distinct
    free = tiny_models.VOCAB_SIZE - tiny_models.FIRST_FREE_ID
    changed = 0
    for p in prompts:
        q = p[:far] + [tiny_models.FIRST_FREE_ID + (p[far] + 50) % free] + p[far + 1:]
        changed += hf_trace(model_dir, q, n)[0] != hf_greedy(model_dir, p, n)
    assert changed >= 3, f"only {changed} of 4 continuations depend on prompt token {far}"


def _edited_copy(src, dst, edit) -> str:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return str(dst)


@pytest.mark.parametrize("feature", ["sliding_window", "partial_rotary_factor"])
def test_phi3_window_and_partial_rotary_are_exercised(feature, tiny_models_cache, tmp_path):
    """The phi3-partial-window checkpoint's references change when its window or its partial
    rotary factor is taken away: an engine that ignored either would fail the tests above."""
    model_dir = tiny_models_cache["phi3-partial-window"]
    spec = ModelSpec.from_dir(model_dir)
    assert (spec.sliding_window, spec.rotary_dim, spec.head_dim) == (8, 8, 16)

    def drop(config):
        if feature == "sliding_window":
            config["sliding_window"] = None
        else:
            config["rope_parameters"]["partial_rotary_factor"] = 1.0

    other = _edited_copy(model_dir, tmp_path / "edited", drop)
    prompts = unambiguous_prompts(model_dir, (16, 20, 12), 10, seed=5)
    changed = sum(hf_trace(other, p, 10)[0] != hf_greedy(model_dir, p, 10) for p in prompts)
    assert changed >= 2, f"only {changed} of 3 references depend on {feature}"


# --- placement: planned bytes are allocated bytes -------------------------------------------------


@pytest.fixture
def qwen3_dir(tiny_models_cache):
    return tiny_models_cache["qwen3"]


@pytest.fixture
def phi3_dir(tiny_models_cache):
    return tiny_models_cache["phi3"]


@pytest.mark.parametrize("arch", ["qwen3", "phi3"])  # q/k norm weights; fused projections
@pytest.mark.parametrize("policy", [EVERY_TIER, EVERY_TIER.replace(compress_weight=True, compress_cache=True)],
                         ids=["every-tier", "compressed"])
def test_planned_bytes_equal_allocated_bytes(request, tiny_models_cache, tmp_path, monkeypatch, arch, policy):
    """tests/test_placement.py's check (every weight, cache, activation file and working buffer
    measured on the real tensors and files of a run) on the new families' tensors."""
    planned_bytes_equal_allocated_bytes(request, tiny_models_cache, tmp_path, monkeypatch, arch, policy)


# --- published configs --------------------------------------------------------------------------

# config.json of the published checkpoints, as written there (auto_map and the like left out).
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
    "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
# Qwen3-0.6B: a tied head, and q/k/v widths (16 x 128) unlike the hidden size (1024).
QWEN3_0_6B = dict(QWEN3_8B, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, max_window_layers=28, tie_word_embeddings=True)
PHI3_MINI_4K = {
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096,
    "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.2",
    "use_cache": True, "vocab_size": 32064,
}
# name: (config, parameters as the model cards and safetensors indexes count them)
PUBLISHED = {
    "Qwen3-8B": (QWEN3_8B, 8_190_735_360),
    "Qwen3-0.6B": (QWEN3_0_6B, 596_049_920),
    "Phi-3-mini-4k-instruct": (PHI3_MINI_4K, 3_821_079_552),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_lays_out_transformers_tensors(name):
    """The units hold exactly the tensors transformers builds from the config (on the meta
    device: no memory, no download), with their shapes and the published parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config, params = PUBLISHED[name]
    spec = ModelSpec.from_config(config)
    tensors = layout_tensors(spec)
    assert sum(torch.Size(shape).numel() for shape in tensors.values()) == params
    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    hf = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    if spec.tie_word_embeddings:
        hf.pop("lm_head.weight")  # tied: transformers' lm_head is the embedding table
    assert tensors == hf


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_plans_on_a_gpu_box_and_a_cpu_box(name):
    spec = ModelSpec.from_config(PUBLISHED[name][0])
    numel = sum(torch.Size(shape).numel() for shape in layout_tensors(spec).values())
    assert_plans_on_a_gpu_box_and_a_cpu_box(spec, numel, gpu_mem=16 * GiB, cpu_mem=32 * GiB, host_mem=8 * GiB)


def test_published_shapes_read_from_the_configs():
    q, q06, phi = (ModelSpec.from_config(PUBLISHED[n][0]) for n in PUBLISHED)
    assert (q.family, q.num_layers, q.hidden_size, q.num_heads, q.num_kv_heads, q.head_dim) == (
        "qwen3", 36, 4096, 32, 8, 128)
    assert (q.intermediate_size, q.vocab_size, q.rope_theta, q.tie_word_embeddings) == (12288, 151936, 1e6, False)
    assert (q.sliding_window, q.attention_bias, q.o_bias, q.dtype) == (None, False, False, "bfloat16")
    assert q06.num_heads * q06.head_dim == 2048 != q06.hidden_size and q06.tie_word_embeddings
    assert (phi.family, phi.num_layers, phi.hidden_size, phi.num_heads, phi.num_kv_heads, phi.head_dim) == (
        "phi3", 32, 3072, 32, 32, 96)
    assert (phi.intermediate_size, phi.vocab_size, phi.norm_eps, phi.sliding_window) == (8192, 32064, 1e-5, 2047)
    assert (phi.rope_scaling, phi.rotary_dim, phi.eos_token_ids) == (None, 96, (32000,))


# --- defaults and refusals -------------------------------------------------------------------------

_MINIMAL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                num_hidden_layers=2, vocab_size=320)


@pytest.mark.parametrize("model_type", ["qwen3", "phi3"])
def test_fields_left_out_take_transformers_defaults(model_type):
    """A config.json without head_dim, rms_norm_eps or max_position_embeddings gets the values
    transformers' config class gives (Qwen3: head_dim 128; Phi-3: eps 1e-5)."""
    from transformers import AutoConfig

    config = dict(_MINIMAL, model_type=model_type)
    spec = ModelSpec.from_config(config)
    hf = AutoConfig.for_model(**config)
    assert spec.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert (spec.norm_eps, spec.max_positions, spec.sliding_window) == (
        hf.rms_norm_eps, hf.max_position_embeddings, hf.sliding_window)


def _write_config(tmp_path, config) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("rope_scaling", [
    {"type": "su", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48},  # Phi-3-mini-128k, first release
    {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48},
    {"rope_type": "linear", "factor": 2.0},  # transformers' Phi-3 refuses it too
], ids=["su", "longrope", "linear"])
def test_phi3_rope_scaling_is_refused_in_one_line(rope_scaling, tmp_path):
    config = dict(PHI3_MINI_4K, rope_scaling=rope_scaling, max_position_embeddings=131072)
    with pytest.raises(UserError) as err:
        ModelSpec.from_dir(_write_config(tmp_path, config))
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "config.json") in message and "'rope_scaling'" in message
    kind = rope_scaling.get("type") or rope_scaling["rope_type"]
    assert f"rope scaling type {kind!r}, which is not implemented" in message and "supported: default" in message


def test_phi3_partial_rotary_factor(tmp_path):
    spec = ModelSpec.from_config(dict(_MINIMAL, model_type="phi3", partial_rotary_factor=0.75))
    assert (spec.head_dim, spec.rotary_dim) == (16, 12)
    spec = ModelSpec.from_config(dict(_MINIMAL, model_type="phi3", rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, partial_rotary_factor=0.75))
    assert spec.rotary_dim == 8  # rope_parameters win, as in transformers
    for bad in (0, 1.5, "0.5", True):
        with pytest.raises(UserError, match="partial_rotary_factor"):
            ModelSpec.from_config(dict(_MINIMAL, model_type="phi3", partial_rotary_factor=bad))
    with pytest.raises(UserError, match="rotates 5 of the head's 16 dims"):
        ModelSpec.from_config(dict(_MINIMAL, model_type="phi3", partial_rotary_factor=0.35))


def test_qwen3_sliding_window_follows_layer_types(tmp_path):
    """transformers' Qwen3 slides the layers from max_window_layers on (or those layer_types
    names) when use_sliding_window is set. All sliding: one window; all full: none; a mix is
    refused in one line, as the engine masks every layer alike."""
    base = dict(_MINIMAL, model_type="qwen3", sliding_window=8)
    assert ModelSpec.from_config(base).sliding_window is None  # use_sliding_window false
    assert ModelSpec.from_config(dict(base, use_sliding_window=True)).sliding_window is None  # from layer 28 on
    assert ModelSpec.from_config(dict(base, use_sliding_window=True, max_window_layers=0)).sliding_window == 8
    assert ModelSpec.from_config(dict(base, use_sliding_window=True, layer_types=["sliding_attention"] * 2,
                                      max_window_layers=28)).sliding_window == 8
    mixed = dict(base, use_sliding_window=True, max_window_layers=1)
    with pytest.raises(UserError) as err:
        ModelSpec.from_dir(_write_config(tmp_path, mixed))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "config.json") in message
    assert "1 sliding, 1 full" in message and "use_sliding_window" in message
    with pytest.raises(UserError, match="layer_types"):
        ModelSpec.from_config(dict(base, use_sliding_window=True, layer_types=["full_attention"]))


def test_every_family_has_layer_math():
    # model/__init__.py imports a family's module by name (spec/families.py's MATH_CLASSES) when
    # a model of that family is built; a name left out or misspelled would show only then
    import importlib

    from flexgen_dist.spec.families import MATH_CLASSES
    from flexgen_dist.spec.model import SUPPORTED

    assert set(MATH_CLASSES) == set(SUPPORTED.values())
    for module_name, class_name in MATH_CLASSES.values():
        assert callable(getattr(importlib.import_module(f"flexgen_dist.model.{module_name}"), class_name))
