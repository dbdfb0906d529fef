"""Every bad model folder is one line and exit 2 (the user's to fix) or exit 1 (the machine's),
never a traceback and never a silent answer.

Each case copies a tiny checkpoint (conftest's session models), damages one thing and runs
`python -m flexgen_dist.run --model DIR` in a subprocess, asserting the exit code, a single line
on stderr and the fragment of the message that says what is wrong. The config.json cases run the
same `main()` in this process (a subprocess each would add ~1.5 s apiece for nothing new: the
code path after argument parsing is the same). I/O errors the test cannot cause for real (EIO;
permission denied as root, who can read anything) are injected by replacing `open`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flexgen_dist.errors import EnvironmentFailure, UserError
from flexgen_dist.model import checkpoint as checkpoint_module
from flexgen_dist.model import safetensors_header
from flexgen_dist.model.checkpoint import CheckpointSource
from flexgen_dist.model.validate import check_finite, validate_checkpoint
from flexgen_dist.spec.layout import model_units
from flexgen_dist.spec.model import ModelSpec
from flexgen_dist.run import main as run_main

REPO = Path(__file__).resolve().parents[1]
UP_PROJ_1 = "model.layers.1.mlp.up_proj.weight"


def run_cli(model_dir: Path) -> tuple[int, list[str]]:
    """Exit code and stderr lines of the run command on `model_dir`, in a subprocess."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "flexgen_dist.run", "--model", str(model_dir), "--gen-len", "2", "--no-warmup"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    return proc.returncode, proc.stderr.strip().splitlines()


def assert_one_line(code: int, lines: list[str], expected_code: int, fragment: str) -> None:
    text = "\n".join(lines)
    assert "Traceback" not in text, text
    assert code == expected_code, text
    assert len(lines) == 1, text
    assert fragment in lines[0], text


def copy_model(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def edit_tensors(path: Path, edit) -> None:
    """Rewrite a safetensors file with `edit(tensors)` applied to its dict of tensors."""
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def poison(tensors: dict, key: str, value: float, count: int) -> None:
    flat = tensors[key].reshape(-1)
    flat[torch.arange(count) * 7 + 3] = value


@pytest.fixture
def llama(llama_dir, tmp_path) -> Path:
    return copy_model(llama_dir, tmp_path)


@pytest.fixture
def sharded(tiny_models_cache, tmp_path) -> Path:
    return copy_model(tiny_models_cache.get("llama", make_sharded=True), tmp_path)


def shards(model_dir: Path) -> tuple[Path, dict]:
    index = model_dir / "model.safetensors.index.json"
    return index, json.loads(index.read_text())


# ---------------------------------------------------------------- damaged files (CLI, subprocess)


def cut(path: Path, size: int) -> None:
    """Keep the first `size` bytes (all but the last -size when negative)."""
    path.write_bytes(path.read_bytes()[:size])


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


FILE_CASES = {
    "cut in the header": (lambda d: cut(d / "model.safetensors", 100), "header length"),
    "cut in the data": (lambda d: cut(d / "model.safetensors", -1000), "is truncated: tensor"),
    "garbage bytes": (lambda d: (d / "model.safetensors").write_bytes(bytes(range(256)) * 16),
                      "header length 506097522914230528 exceeds the file size 4096"),
    "garbage header": (lambda d: (d / "model.safetensors").write_bytes((20).to_bytes(8, "little") + b"\xff" * 40),
                       "the header is not valid JSON"),
    "zero-length file": (lambda d: (d / "model.safetensors").write_bytes(b""), "is empty (0 bytes)"),
    "trailing bytes": (lambda d: append(d / "model.safetensors", b"junk"), "4 bytes after its last tensor"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no weights in"),
    "fewer layers in config": (lambda d: set_config(d, num_hidden_layers=1),
                               "has 2 decoder layers (it holds 'model.layers.1."),
    "more layers in config": (lambda d: set_config(d, num_hidden_layers=3), "no tensors of layer 2"),
    "mis-shaped tensor": (
        lambda d: edit_tensors(d / "model.safetensors", lambda t: t.update({UP_PROJ_1: t[UP_PROJ_1][:127]})),
        f"tensor '{UP_PROJ_1}' in "),
    "missing tensor": (lambda d: edit_tensors(d / "model.safetensors", lambda t: t.pop(UP_PROJ_1)),
                       f"has no tensor '{UP_PROJ_1}' (shape (128, 64))"),
    "extra tensor": (lambda d: edit_tensors(d / "model.safetensors",
                                            lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(3)})),
                     "tensor 'model.layers.0.mlp.extra.weight' in"),
    "integer tensor": (lambda d: edit_tensors(d / "model.safetensors",
                                              lambda t: t.update({UP_PROJ_1: t[UP_PROJ_1].to(torch.int8)})),
                       "is I8, not a floating-point type"),
    "NaN weights": (lambda d: edit_tensors(d / "model.safetensors", lambda t: poison(t, UP_PROJ_1, float("nan"), 12)),
                    f"{UP_PROJ_1} has 12 NaN values"),
    "Inf weights": (lambda d: edit_tensors(d / "model.safetensors", lambda t: poison(t, UP_PROJ_1, float("-inf"), 3)),
                    f"{UP_PROJ_1} has 3 Inf values"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_damaged_checkpoint_is_one_line(case, llama):
    damage, fragment = FILE_CASES[case]
    damage(llama)
    code, lines = run_cli(llama)
    assert_one_line(code, lines, 2, fragment)


def test_mis_shaped_message_names_both_shapes(llama):
    edit_tensors(llama / "model.safetensors", lambda t: t.update({UP_PROJ_1: t[UP_PROJ_1][:127]}))
    with pytest.raises(UserError, match=r"has shape \(127, 64\), config.json implies \(128, 64\)"):
        CheckpointSource(llama)


def test_first_non_finite_layer_is_named(llama):
    """Weights are read in layer order, so the message names the earliest bad layer."""

    def edit(tensors):
        poison(tensors, UP_PROJ_1, float("nan"), 12)
        poison(tensors, "model.layers.0.mlp.down_proj.weight", float("inf"), 2)
        poison(tensors, "model.layers.0.mlp.down_proj.weight", float("nan"), 1)  # overwrites the first Inf

    edit_tensors(llama / "model.safetensors", edit)
    code, lines = run_cli(llama)
    assert_one_line(code, lines, 2, "model.layers.0.mlp.down_proj.weight has 1 NaN value and 1 Inf value")
    assert "the first at index (0, 3)" in lines[0]


SHARD_CASES = {
    "index names a missing shard": (lambda d: min(d.glob("model-*.safetensors")).unlink(), "is missing; re-download"),
    "index is not JSON": (lambda d: (d / "model.safetensors.index.json").write_text("{weight_map"), "is not valid JSON"),
    "index without weight_map": (lambda d: (d / "model.safetensors.index.json").write_text("[]"),
                                 "is not a safetensors index"),
    "key in the index, not in its shard": (lambda d: move_key_in_index(d), "but that shard has no such tensor"),
    "shard outside the folder": (lambda d: point_index_at(d, "../model.safetensors"),
                                 "a shard must be a file name in the model folder"),
}


def move_key_in_index(model_dir: Path) -> None:
    """Map one tensor to a shard that does not hold it."""
    index, data = shards(model_dir)
    files = sorted(set(data["weight_map"].values()))
    key = next(k for k, v in data["weight_map"].items() if v == files[0])
    data["weight_map"][key] = files[1]
    index.write_text(json.dumps(data))


def point_index_at(model_dir: Path, name: str) -> None:
    index, data = shards(model_dir)
    data["weight_map"][next(iter(data["weight_map"]))] = name
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_damaged_shards_are_one_line(case, sharded):
    assert len(list(sharded.glob("model-*.safetensors"))) >= 2
    damage, fragment = SHARD_CASES[case]
    damage(sharded)
    code, lines = run_cli(sharded)
    assert_one_line(code, lines, 2, fragment)


def test_shard_tensor_the_index_does_not_list(sharded):
    index, data = shards(sharded)
    files = list(data["weight_map"].values())
    key = next(k for k, v in data["weight_map"].items() if files.count(v) > 1)  # its shard stays listed
    del data["weight_map"][key]
    index.write_text(json.dumps(data))
    with pytest.raises(UserError, match=f"holds '{key}' but .* does not list it"):
        CheckpointSource(sharded)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file; see test_permission_denied_injected")
def test_unreadable_file(llama):
    (llama / "model.safetensors").chmod(0)
    code, lines = run_cli(llama)
    assert_one_line(code, lines, 2, "permission denied")


# ---------------------------------------------------------------- I/O errors (injected)


def failing_open(code: int):
    def fake_open(path, *args, **kwargs):
        if str(path).endswith(".safetensors"):
            raise OSError(code, os.strerror(code), str(path))
        return open(path, *args, **kwargs)

    return fake_open


def test_permission_denied_injected(llama, monkeypatch):
    monkeypatch.setattr(safetensors_header, "open", failing_open(errno.EACCES), raising=False)
    with pytest.raises(UserError, match="model.safetensors': permission denied; make it readable"):
        CheckpointSource(llama)


def test_eio_in_header_is_an_environment_failure(llama, monkeypatch):
    monkeypatch.setattr(safetensors_header, "open", failing_open(errno.EIO), raising=False)
    with pytest.raises(EnvironmentFailure, match=r"I/O error \(EIO\)"):
        CheckpointSource(llama)


def test_eio_while_placing_exits_1(llama, monkeypatch, capsys, caplog):
    """The header scan succeeds, reading a tensor fails: exit code 1, one logged line."""
    monkeypatch.setattr(checkpoint_module, "open", failing_open(errno.EIO), raising=False)
    code = run_main(["--model", str(llama), "--gen-len", "2", "--no-warmup"])
    assert code == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "I/O error (EIO)" in errors[0].getMessage()
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------- config.json (CLI, in process)


def set_config(model_dir: Path, **fields) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in fields.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


DELETE = object()

CONFIG_CASES = {
    "string size": (dict(hidden_size="64"), "'hidden_size' is \"64\" (a string), expected a positive integer"),
    "fractional size": (dict(hidden_size=64.5), "'hidden_size' is 64.5 (a number), expected a positive integer"),
    "boolean size": (dict(hidden_size=True), "'hidden_size' is true (a boolean), expected a positive integer"),
    "null required": (dict(num_hidden_layers=None), "'num_hidden_layers' is null, expected a positive integer"),
    "missing required": (dict(intermediate_size=DELETE), "has no 'intermediate_size' (a positive integer)"),
    "negative size": (dict(intermediate_size=-128), "'intermediate_size' is -128 (an integer), expected a positive"),
    "vocab 0": (dict(vocab_size=0), "'vocab_size' is 0 (an integer), expected a positive integer"),
    "heads do not divide hidden": (dict(num_attention_heads=5, num_key_value_heads=5, head_dim=DELETE),
                                   "num_attention_heads 5 does not divide hidden_size 64"),
    "kv heads do not divide heads": (dict(num_key_value_heads=3), "num_key_value_heads 3 does not divide"),
    "eos of the wrong type": (dict(eos_token_id="2"), "'eos_token_id' is \"2\" (a string), expected a token id"),
    "eos list with a string": (dict(eos_token_id=[2, "x"]), "'eos_token_id' is [2, \"x\"] (a list)"),
    "flag as a string": (dict(tie_word_embeddings="false"), "'tie_word_embeddings' is \"false\" (a string), expected true"),
    "rope not an object": (dict(rope_parameters="linear"), "'rope_parameters' is \"linear\" (a string), expected an object"),
    "rope llama3 incomplete": (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "has no 'low_freq_factor'"),
    "rope factor a string": (dict(rope_parameters={"rope_type": "linear", "factor": "2"}), "'factor' is \"2\" (a string)"),
    "rope llama3 inverted": (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                                   "high_freq_factor": 1.0, "original_max_position_embeddings": 32}),
                             "high_freq_factor 1.0 must be greater than low_freq_factor 4.0"),
    "rope type unknown": (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope scaling type 'yarn'"),
    # a 4.x rope_scaling beside transformers 5's rope_parameters: transformers would use the scaling
    "rope_scaling type unknown": (dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                                       rope_scaling={"rope_type": "yarn", "factor": 2.0}),
                                  "'rope_scaling' has rope scaling type 'yarn', which is not implemented here "
                                  "(positions would be encoded wrongly); supported: default, linear, llama3"),
    "rope legacy type key unknown": (dict(rope_parameters=DELETE, rope_scaling={"type": "dynamic", "factor": 2.0}),
                                     "'rope_scaling' has rope scaling type 'dynamic'"),
    "rope type not a string": (dict(rope_parameters={"rope_type": 3}), "'rope_parameters' has rope_type 3 (an integer)"),
    "rope both, differing": (dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                                  rope_scaling={"rope_type": "linear", "factor": 2.0}),
                             "has both 'rope_parameters' {\"rope_theta\": 10000.0, \"rope_type\": \"default\"} (an object) "
                             "and 'rope_scaling'"),
    "dtype int8": (dict(dtype="int8"), "'dtype' is \"int8\" (a string), expected one of float32, float16, bfloat16"),
    "torch_dtype int8": (dict(dtype=DELETE, torch_dtype="int8"), "'torch_dtype' is \"int8\" (a string), expected one"),
    "dtype a number": (dict(dtype=16), "'dtype' is 16 (an integer), expected a string"),
    "model_type a list": (dict(model_type=["llama"]), "model_type [\"llama\"] (a list), which is not supported"),
    "quantized": (dict(quantization_config={"quant_method": "gptq"}), "quantized checkpoints are not supported"),
    "NaN epsilon": (dict(rms_norm_eps=float("nan")), "'rms_norm_eps' is NaN (not a finite number)"),
}

RAW_CONFIGS = {
    "a list": (b"[1, 2]", "holds [1, 2] (a list), expected a JSON object"),
    "not UTF-8": (b'{"model_type": "\xff\xfe"}', "is not UTF-8 text (undecodable byte at offset 16)"),
    "empty": (b"", "config.json' is empty"),
    "not JSON": (b'{"model_type": "llama",', "is not valid JSON (line 1"),
}


def run_in_process(model_dir: Path, capsys) -> tuple[int, list[str]]:
    code = run_main(["--model", str(model_dir), "--gen-len", "2", "--no-warmup"])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_field_is_one_line(case, llama, capsys):
    fields, fragment = CONFIG_CASES[case]
    set_config(llama, **fields)
    code, lines = run_in_process(llama, capsys)
    assert_one_line(code, lines, 2, fragment)
    assert "config.json" in lines[0]


@pytest.mark.parametrize("case", list(RAW_CONFIGS))
def test_unreadable_config_is_one_line(case, llama, capsys):
    data, fragment = RAW_CONFIGS[case]
    (llama / "config.json").write_bytes(data)
    code, lines = run_in_process(llama, capsys)
    assert_one_line(code, lines, 2, fragment)


def test_bad_config_in_a_subprocess(llama):
    set_config(llama, hidden_size="64")
    code, lines = run_cli(llama)
    assert_one_line(code, lines, 2, "'hidden_size' is \"64\" (a string)")


def test_missing_optional_fields_take_transformers_defaults(llama):
    set_config(llama, num_key_value_heads=DELETE, head_dim=DELETE, rms_norm_eps=DELETE, tie_word_embeddings=DELETE,
               pad_token_id=-1, rope_parameters=DELETE, max_position_embeddings=None)
    spec = ModelSpec.from_dir(llama)
    assert (spec.num_kv_heads, spec.head_dim, spec.norm_eps) == (4, 16, 1e-6)
    assert (spec.tie_word_embeddings, spec.pad_token_id, spec.rope_theta, spec.rope_scaling) == (False, None, 10000.0, None)
    assert spec.max_positions == 2048


def test_rope_and_dtype_spellings_that_are_read(llama):
    """What real configs write is still read: 4.x rope_scaling (with the legacy "type" key) and
    rope_theta beside it, both keys when they agree, torch_dtype, and "torch.float16"."""
    linear = {"type": "linear", "factor": 2.0}
    set_config(llama, rope_parameters=DELETE, rope_scaling=linear, rope_theta=20000.0, dtype=DELETE,
               torch_dtype="torch.float16")
    spec = ModelSpec.from_dir(llama)
    assert (spec.rope_theta, spec.rope_scaling["rope_type"], spec.rope_scaling["factor"]) == (20000.0, "linear", 2.0)
    assert spec.dtype == "float16"
    set_config(llama, rope_parameters={"rope_type": "linear", "factor": 2.0}, dtype="bfloat16")
    spec = ModelSpec.from_dir(llama)
    assert (spec.rope_scaling["rope_type"], spec.dtype) == ("linear", "bfloat16")


TOKENIZER_CASES = {
    "garbage": ("tokenizer.json", "{this is not a tokenizer",
                "'{dir}/tokenizer.json' is not valid JSON (line 1, column 2"),
    "a list": ("tokenizer.json", "[1, 2]", "'{dir}/tokenizer.json' holds a JSON list, not an object"),
    "not a tokenizer": ("tokenizer.json", '{"version": "1.0", "model": {"type": "Nope"}}',
                        "cannot load the tokenizer in '{dir}'"),
    "config garbage": ("tokenizer_config.json", "{", "'{dir}/tokenizer_config.json' is not valid JSON"),
    "nested too deeply": ("tokenizer.json", "[" * 100_000 + "]" * 100_000, "'{dir}/tokenizer.json' is nested too deeply"),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_damaged_tokenizer_is_one_line(case, tiny_models_cache, tmp_path, capsys):
    model_dir = copy_model(tiny_models_cache.get("llama", tokenizer=True), tmp_path)
    capsys.readouterr()  # making the fixture prints progress
    name, text, fragment = TOKENIZER_CASES[case]
    (model_dir / name).write_text(text)
    code, lines = run_in_process(model_dir, capsys)
    assert_one_line(code, lines, 2, fragment.format(dir=model_dir))
    assert "restore the tokenizer files" in lines[0]


def test_opt_heads_must_divide_hidden(opt_dir, tmp_path):
    model = copy_model(opt_dir, tmp_path)
    set_config(model, num_attention_heads=6)
    with pytest.raises(UserError, match="num_attention_heads 6 does not divide hidden_size 64"):
        ModelSpec.from_dir(model)


# ---------------------------------------------------------------- what is accepted


def units_of(model_dir: Path):
    return model_units(ModelSpec.from_dir(model_dir))


def test_harmless_extras_are_accepted(llama_tied_dir, tmp_path):
    """Rotary inv_freq buffers, and a stored lm_head beside a tied head, are ignored as in transformers."""
    model = copy_model(llama_tied_dir, tmp_path)

    def edit(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    edit_tensors(model / "model.safetensors", edit)
    validate_checkpoint(model, units_of(model))
    set_config(model, tie_word_embeddings=False)  # now lm_head.weight is expected and present
    validate_checkpoint(model, units_of(model))


def test_checkpoint_without_model_prefix_loads(llama):
    """Checkpoints saved from the base model name tensors without the leading "model."."""
    edit_tensors(llama / "model.safetensors",
                 lambda t: t.update({k.removeprefix("model."): t.pop(k) for k in list(t)}))
    source = CheckpointSource(llama)
    ws = next(ws for unit in units_of(llama) for ws in unit.weights if ws.key == UP_PROJ_1)
    assert torch.equal(source.get(ws), load_file(llama / "model.safetensors")[UP_PROJ_1.removeprefix("model.")])
    source.close()


def test_get_returns_the_stored_tensors(sharded, llama_dir):
    """Reading by offsets gives exactly what safetensors gives, across shards."""
    source = CheckpointSource(sharded)
    reference = load_file(llama_dir / "model.safetensors")
    for unit in units_of(sharded):
        for ws in unit.weights:
            assert torch.equal(source.get(ws), reference[ws.key]), ws.key
    source.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_check_finite_counts_bad_values(dtype):
    tensor = torch.randn(33, 17).to(dtype)
    check_finite("w", tensor)  # finite: no error
    tensor[5, 2] = float("inf")
    tensor[7, 0] = float("nan")
    tensor[30, 16] = float("nan")
    with pytest.raises(UserError, match=r"^w has 2 NaN values and 1 Inf value \(of 561, the first at index \(5, 2\)\)"):
        check_finite("w", tensor)
