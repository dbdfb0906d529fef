"""The CLI end to end, and every kind of bad input: one line on stderr, exit code 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest

from tiny_models import make_tiny_model

# CUDA hidden: the CLI must compute in fp32 on the CPU, as the references do
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "flexgen_dist.run", *map(str, args)],
        capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300,
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("cli") / "llama")


def assert_user_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_jsonl_in_jsonl_out_same_order_and_ids(llama_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"id": "a", "input_ids": [5, 6, 7]}, {"id": 7, "input_ids": [9] * 12}, {"id": "c", "input_ids": [3]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    proc = run_cli("--model", llama_dir, "--input", src, "--output", out, "--gen-len", 5,
                   "--gpu-batch-size", 2, "--percent", 0, 100, 100, 0, 100, 0)
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["a", 7, "c"]
    # the same tokens as the API gives for the same prompts and policy
    from flexgen_dist import LLM, Policy, Runtime

    policy = Policy(gpu_batch_size=2, w_gpu_percent=0, w_cpu_percent=100)
    with LLM(llama_dir, policy=policy, runtime=Runtime(device="cpu")) as llm:
        want = llm.generate([r["input_ids"] for r in rows], max_new_tokens=5).outputs
    assert [g["output_ids"] for g in got] == [w.output_ids for w in want]
    assert all(len(g["output_ids"]) == 5 for g in got)  # the tiny model never emits EOS
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("throughput:") and "prefill" in last and "decode" in last and "total" in last


def test_missing_model_folder(tmp_path):
    assert_user_error(run_cli("--model", tmp_path / "nope"), "does not exist")


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert_user_error(run_cli("--model", tmp_path), "supported: llama, mistral, opt, phi3, qwen2, qwen3")


@pytest.mark.parametrize("flags, fragment", [
    (("--percent", 80, 30, 100, 0, 100, 0),
     "--percent's 1st value (weights on gpu) + --percent's 2nd value (weights on cpu) = 110 is over 100"),
    (("--percent", 100, 0, -10, 0, 100, 0), "--percent's 3rd value (KV cache on gpu) must be a number from 0 to 100"),
    (("--compress-weight", "--compress-group-size", 3), "--compress-group-size=3 must be even with --compress-bits 4"),
    (("--compress-cache", "--compress-cache-window", -5), "--compress-cache-window=-5 must be a whole number"),
    (("--attn-sparsity", 0), "--attn-sparsity must be in (0, 1]"),
])
def test_a_bad_policy_flag_is_named_as_given(llama_dir, flags, fragment):
    """The policy's own checks name its fields (Policy.w_gpu_percent, CompressionConfig.group_size);
    on the command line the error names the flag the user gave."""
    proc = run_cli("--model", llama_dir, *flags)
    assert_user_error(proc, fragment)
    assert "CompressionConfig" not in proc.stderr and "_percent" not in proc.stderr, proc.stderr


def test_prompt_longer_than_positions(llama_dir, tmp_path):
    src = tmp_path / "long.jsonl"
    src.write_text(json.dumps({"id": 1, "input_ids": [4] * 500}) + "\n")
    assert_user_error(run_cli("--model", llama_dir, "--input", src, "--output", tmp_path / "out.jsonl"), "positions")


def test_empty_prompt_list(llama_dir, tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("\n")
    assert_user_error(run_cli("--model", llama_dir, "--input", src), "no prompts")


def test_bad_json_line_names_file_and_line(llama_dir, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"id": 1, "input_ids": [1, 2]}\n{"id": 2, "prompt": \n')
    assert_user_error(run_cli("--model", llama_dir, "--input", src), "bad.jsonl:2")


def test_failed_run_leaves_existing_output_untouched(llama_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    src = tmp_path / "long.jsonl"
    src.write_text(json.dumps({"id": 1, "input_ids": [4] * 500}) + "\n")
    assert_user_error(run_cli("--model", llama_dir, "--input", src, "--output", out), "positions")
    assert out.read_text() == "precious\n"


def test_weights_on_disk_without_offload_dir(llama_dir):
    assert_user_error(run_cli("--model", llama_dir, "--percent", 0, 0, 100, 0, 100, 0), "--offload-dir")


def test_api_errors_are_user_errors(llama_dir):
    from flexgen_dist import LLM, Runtime, UserError

    llm = LLM(llama_dir, runtime=Runtime(device="cpu"))
    with pytest.raises(UserError, match="empty"):
        llm.generate([])
    with pytest.raises(UserError, match="prompt 1 is empty"):
        llm.generate([[1], []])
    with pytest.raises(UserError, match="no tokenizer"):
        llm.generate(["text"])


def test_trace_shows_loads_on_io_threads_beside_compute(llama_dir, tmp_path):
    trace = tmp_path / "trace.json"
    proc = run_cli("--model", llama_dir, "--percent", 0, 50, 0, 100, 100, 0, "--offload-dir", tmp_path / "off",
                   "--gen-len", 3, "--num-gpu-batches", 2, "--gpu-batch-size", 2, "--trace", trace)
    assert proc.returncode == 0, proc.stderr
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    names = " ".join(e["name"] for e in spans)
    for word in ("load weight", "load cache", "compute", "store cache"):
        assert word in names
    compute_threads = {e["tid"] for e in spans if e["cat"] == "compute"}
    load_threads = {e["tid"] for e in spans if e["name"].startswith("load weight")}
    assert load_threads - compute_threads, "weight loads should run on I/O threads"
    assert all(e["dur"] >= 0 for e in spans)


def test_a_single_process_run_imports_only_what_it_uses():
    """The bundled Llama model, one process, nothing compressed or on disk: no other family's layer
    math, no pipeline messages or launcher readers, no GGUF or offload-folder code, no named
    machines, no quantization (weights or cache), no row tables, no resume log for a run that
    prints (each is imported, in one place, when a run needs it); 60 modules in all (issue 20)."""
    code = """
import runpy, sys
sys.argv = ["run", "--gen-len", "2", "--num-prompts", "2", "--no-warmup", "-q"]
try:
    runpy.run_module("flexgen_dist.run", run_name="__main__")
except SystemExit as stop:
    assert not stop.code, stop.code
print(" ".join(sorted(name for name, m in sys.modules.items()  # modules, not packages
                      if name.startswith("flexgen_dist.") and m is not None and not hasattr(m, "__path__"))))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(proc.stdout.splitlines()[-1].split())  # the last line: the modules loaded
    assert "flexgen_dist.model.llama" in loaded
    unused = {f"flexgen_dist.{name}" for name in (
        "model.gemma3", "model.moe", "model.opt", "model.phi3", "model.qwen3", "model.gguf", "spec.gguf",
        "parallel.comm", "parallel.rendezvous", "parallel.slurm", "parallel.mpi", "parallel.hostlist",
        "parallel.partition", "engine.messages", "storage.offload_dir", "storage.offload_identity",
        "storage.piece_hash", "machine.presets", "storage.quantize", "storage.quantize_groups", "storage.kivi",
        "storage.rows", "jobs.resume")}
    assert loaded.isdisjoint(unused), sorted(loaded & unused)
    assert len(loaded) <= 60, sorted(loaded)
