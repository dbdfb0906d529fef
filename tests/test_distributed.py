"""Pipeline runs over gloo on the CPU: 2 and 3 ranks give the same ids as one process, and a
dead or hung rank stops the others with an error that names it."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from rank_processes import RankProcess
from tiny_models import make_tiny_model, random_prompts

pytestmark = pytest.mark.dist

# CUDA hidden: ranks compute in fp32 on the CPU over gloo, as the single-process reference does
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
MPIRUN = shutil.which("mpirun")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    # 4 decoder layers, so 3 ranks each get at least one
    return {arch: make_tiny_model(arch, root / arch, num_hidden_layers=4) for arch in ("llama", "opt")}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    # 7 prompts of different lengths: not a multiple of the block (2 x 2)
    path = tmp_path_factory.mktemp("prompts") / "in.jsonl"
    prompts = random_prompts([3, 11, 5, 17, 8, 2, 13], seed=3)
    path.write_text("".join(json.dumps({"id": f"p{i}", "input_ids": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def job_args(model, prompts_file, out, offload):
    return [
        "-m", "flexgen_dist.run", "--model", str(model), "--input", str(prompts_file), "--output", str(out),
        "--gen-len", "10", "--gpu-batch-size", "2", "--num-gpu-batches", "2",
        "--percent", "30", "30", "50", "50", "100", "0", "--offload-dir", str(offload), "--comm-timeout", "120",
    ]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def single_outputs(models, prompts_file, tmp_path_factory):
    out = {}
    for arch, model in models.items():
        tmp = tmp_path_factory.mktemp(f"single-{arch}")
        proc = subprocess.run([sys.executable, *job_args(model, prompts_file, tmp / "out.jsonl", tmp / "off")],
                              env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out[arch] = read(tmp / "out.jsonl")
    return out


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("ranks", [2, 3])
def test_torchrun_ranks_match_one_process(models, prompts_file, single_outputs, tmp_path, arch, ranks):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           *job_args(models[arch], prompts_file, tmp_path / "out.jsonl", tmp_path / "off")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read(tmp_path / "out.jsonl") == single_outputs[arch]
    # rank 0 alone prints the summary
    assert proc.stdout.count("throughput:") == 1


def test_trace_per_rank_shows_sends_and_receives(models, prompts_file, tmp_path):
    trace = tmp_path / "trace.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *job_args(models["llama"], prompts_file, tmp_path / "out.jsonl", tmp_path / "off"), "--trace", str(trace)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = " ".join(e["name"] for e in json.loads(trace.read_text())["traceEvents"])
    second = " ".join(e["name"] for e in json.loads((tmp_path / "trace.rank1.json").read_text())["traceEvents"])
    assert "send activation" in first and "recv tokens" in first
    assert "recv activation" in second and "send tokens" in second


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (pip install 'flexgen_dist[mpi]')")
def test_mpirun_ranks_match_one_process(models, prompts_file, single_outputs, tmp_path):
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd = [MPIRUN, "-np", "2", *root, "--oversubscribe", "-x", "OMP_NUM_THREADS=1", "-x", "HF_HUB_OFFLINE=1",
           sys.executable, *job_args(models["llama"], prompts_file, tmp_path / "out.jsonl", tmp_path / "off")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read(tmp_path / "out.jsonl") == single_outputs["llama"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    # long enough positions for a job that runs for minutes unless interrupted
    return make_tiny_model("llama", tmp_path_factory.mktemp("long") / "llama", max_position_embeddings=4096)


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_failed_rank_stops_the_others_with_its_name(long_model, tmp_path, fault):
    timeout = 8
    port = _free_port()
    ranks = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "flexgen_dist.run", "--model", str(long_model), "--prompt-len", "4",
               "--num-prompts", "16", "--gpu-batch-size", "8", "--gen-len", "4000", "--no-warmup",
               "--comm-timeout", str(timeout), "--output", str(tmp_path / "out.jsonl"), "--verbose"]
        ranks.append(RankProcess(cmd, env))
    rank0, rank1 = ranks
    try:
        # The fault comes after both ranks joined (the rendezvous waits at least 60 s, however short
        # --comm-timeout is, so a slow start is not a fault); from then on only the pipeline's
        # sends and receives wait on rank 1, each for at most --comm-timeout.
        for rank in ranks:
            rank.wait_for_line("process group ready", timeout_s=600)
        os.kill(rank1.proc.pid, signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        code, err = rank0.finish(timeout_s=600)  # an upper bound for a hung test, not a measurement
    finally:
        for rank in ranks:
            rank.kill()
    assert code == 1, err[-3000:]  # a dead or hung peer: exit code 1, one line
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "rank 1 died or hung" in errors[0], err[-3000:]
    assert not (tmp_path / "out.jsonl").exists()
