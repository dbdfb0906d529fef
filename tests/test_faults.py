"""Faults during a run: values that overflow, a disk that fills up, an offload folder that cannot
be used. Each gives one line of the right class (exit 2: the user can fix it; exit 1: the machine
failed), never a silent wrong answer."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models
from flexgen_dist import LLM, Policy, Runtime
from flexgen_dist.errors import EnvironmentFailure, UserError

CPU = Runtime(device="cpu")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture()
def overflowing_llama(tmp_path):
    """Finite weights whose products overflow fp32: decoder layer 1's MLP output is inf."""
    model = tiny_models.make_tiny_model("llama", tmp_path / "overflow")
    weights = {key: t.float() for key, t in load_file(model / "model.safetensors").items()}
    weights["model.layers.1.mlp.down_proj.weight"] *= 1e30  # finite in fp32, as are the products before it
    weights["model.layers.1.mlp.up_proj.weight"] *= 1e10
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model


def test_a_layer_that_overflows_is_named(overflowing_llama):
    with LLM(overflowing_llama, policy=Policy(gpu_batch_size=2), runtime=CPU) as llm:
        with pytest.raises(UserError, match=r"output of decoder layer 1 \(schedule layer 2\) holds inf or NaN"):
            llm.generate([[5, 6, 7], [8, 9]], max_new_tokens=3)


def test_an_overflow_is_named_before_it_is_sampled(overflowing_llama):
    """Sampling NaN logits would die in torch.multinomial: the flags are read before it."""
    with LLM(overflowing_llama, policy=Policy(gpu_batch_size=2), runtime=CPU) as llm:
        with pytest.raises(UserError, match=r"decoder layer 1 \(schedule layer 2\) holds inf or NaN"):
            llm.generate([[5, 6, 7], [8, 9]], max_new_tokens=3, do_sample=True, temperature=0.7)


def test_the_cli_stops_with_one_line_instead_of_printing_zeros(overflowing_llama):
    proc = subprocess.run([sys.executable, "-m", "flexgen_dist.run", "--model", str(overflowing_llama), "--prompt-len", "4",
                           "--gen-len", "3", "--no-warmup"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "decoder layer 1" in lines[0], proc.stderr


def test_a_disk_that_fills_up_mid_run_is_an_environment_failure(llama_dir, tmp_path, monkeypatch):
    policy = Policy(gpu_batch_size=2, cache_gpu_percent=0, cache_cpu_percent=0)  # the KV cache on disk
    with LLM(llama_dir, policy=policy, offload_dir=tmp_path, runtime=CPU) as llm:
        real = os.pwrite
        calls = []

        def full_after_some(fd, data, offset):
            calls.append(1)
            if len(calls) > 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", full_after_some)
        with pytest.raises(EnvironmentFailure, match="the disk is full"):
            llm.generate([[5, 6, 7], [8, 9]], max_new_tokens=4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("cache-")], "the block's files were left behind"


def test_an_offload_dir_that_is_a_file_is_refused(llama_dir, tmp_path):
    target = tmp_path / "not-a-folder"
    target.write_text("precious")
    with pytest.raises(UserError, match="is not a folder"):
        LLM(llama_dir, policy=Policy(w_gpu_percent=0, w_cpu_percent=0), offload_dir=target, runtime=CPU)
    assert target.read_text() == "precious"


@pytest.fixture()
def tiny_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_an_offload_dir_too_small_is_refused_before_any_write(llama_dir, tiny_tmpfs):
    with pytest.raises(UserError, match="on the disk tier but 64.00 KiB are available"):
        LLM(llama_dir, policy=Policy(w_gpu_percent=0, w_cpu_percent=0), offload_dir=tiny_tmpfs, runtime=CPU)
    leftovers = [p for p in tiny_tmpfs.rglob("*") if p.is_file() and not p.name.endswith(".json")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("module", ["run", "eval"])
def test_an_address_space_too_small_for_torch_is_one_line(module):
    import resource

    def cap():  # 400 MiB: torch's import would abort with std::bad_alloc
        resource.setrlimit(resource.RLIMIT_AS, (400 << 20, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", f"flexgen_dist.{module}"], capture_output=True, text=True,
                          preexec_fn=cap, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ulimit -v" in lines[0] and "400 MiB" in lines[0], proc.stderr[-2000:]


def test_a_memory_cgroup_too_small_to_start_is_named(monkeypatch, capsys):
    from pathlib import Path

    from flexgen_dist.cli import shell as startup  # the checks before torch
    from flexgen_dist.machine import detect

    group = detect.CgroupMemory(version=1, group=Path("/sys/fs/cgroup/memory/job"), limit=180 << 20, working_set=20 << 20)
    monkeypatch.setattr(detect, "cgroup_memory", lambda: group)
    with pytest.raises(SystemExit) as stop:
        startup.refuse_too_little_memory()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/sys/fs/cgroup/memory/job leaves 160 MiB (limit 180 MiB)" in err
    monkeypatch.setattr(detect, "cgroup_memory", lambda: detect.CgroupMemory(1, Path("/g"), 8 << 30, 1 << 30))
    startup.refuse_too_little_memory()  # room enough: no exit
