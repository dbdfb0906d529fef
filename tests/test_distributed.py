"""Pipeline runs over gloo on the CPU: 2 and 3 ranks give the same ids as one process, and a
dead or hung rank stops the others with an error that names it."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rank_processes import RankProcess
from tiny_models import make_tiny_model, random_prompts

pytestmark = pytest.mark.dist

# CUDA hidden: ranks compute in fp32 on the CPU over gloo, as the single-process reference does
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
MPIRUN = shutil.which("mpirun")
REPO = Path(__file__).resolve().parents[1]


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


# The job runs on both ranks until rank 1 is about to send its first token ids back to rank 0 and
# rank 0 is about to wait for them; each says so on stderr and holds there: rank 1 for good (alive
# and connected, it never sends), rank 0 until the file named by its second argument exists. The
# test then kills rank 1 or leaves it hung and creates the file, so rank 0's wait starts when the
# fault is certain. As "rank0-least-wait" rank 0 waits as little as its plan allows once it has a
# plan (the floor --comm-timeout drops to 1 ms; the setup's waits, before the plan, keep it).
RANK_CHILD = r"""
import json, os, sys, threading, time
from flexgen_dist import run
from flexgen_dist.parallel import comm
from flexgen_dist.parallel.group import Pipeline

role, go, argv = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if role == "stop":
    send = comm.PipeComm.send
    def send_or_stop(self, tensor, dst, tag):
        if tag == comm.TOKENS:
            print("rank 1 stops before sending token ids", file=sys.stderr, flush=True)
            threading.Event().wait()
        return send(self, tensor, dst, tag)
    comm.PipeComm.send = send_or_stop
else:
    result = comm.RecvHandle.result
    def result_after_go(self):
        if not os.path.exists(go):
            print("rank 0 holds before waiting for token ids", file=sys.stderr, flush=True)
        while not os.path.exists(go):
            time.sleep(0.01)
        return result(self)
    comm.RecvHandle.result = result_after_go
    if role == "rank0-least-wait":
        expect = Pipeline.expect_tasks
        def expect_least(self, task_s):
            self.timeout_s = 0.001
            expect(self, task_s)
        Pipeline.expect_tasks = expect_least
sys.exit(run.main(argv))
"""


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_failed_rank_stops_the_others_with_its_name(models, tmp_path, fault):
    """Rank 0 waits for token ids from rank 1, which has stopped before sending them. A dead rank 1
    is noticed without waiting out the wait (a long one here); a hung one when the wait (as short
    as the plan allows here) runs out."""
    port, go = _free_port(), tmp_path / "go"
    ranks = []
    for rank, role in enumerate(["rank0-least-wait" if fault == "hangs" else "rank0", "stop"]):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
        argv = ["--model", str(models["llama"]), "--prompt-len", "4", "--num-prompts", "4", "--gpu-batch-size", "2",
                "--gen-len", "4", "--no-warmup", "--comm-timeout", "300", "--output", str(tmp_path / "out.jsonl"),
                "--verbose"]
        ranks.append(RankProcess([sys.executable, "-c", RANK_CHILD, role, str(go), json.dumps(argv)], env))
    rank0, rank1 = ranks
    try:
        rank1.wait_for_line("rank 1 stops before sending token ids", timeout_s=600)
        rank0.wait_for_line("rank 0 holds before waiting for token ids", timeout_s=600)
        if fault == "dies":
            rank1.kill()
        go.touch()
        code, err = rank0.finish(timeout_s=600)  # an upper bound for a hung test, not a measurement
        rank1_alive = rank1.proc.poll() is None
    finally:
        for rank in ranks:
            rank.kill()
    assert code == 1, err[-3000:]  # a dead or hung peer: exit code 1, one line
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, err[-3000:]
    assert "rank 0: receiving token ids from rank 1 " in errors[0], errors[0]
    assert errors[0].endswith("; rank 1 died or hung"), errors[0]
    wait_s = re.search(r"rank 0 waits up to (\S+) s for a peer", err).group(1)
    if fault == "dies":
        assert wait_s == "300" and "timed out" not in errors[0].lower(), errors[0]  # not waited out
    else:
        assert rank1_alive  # a hang, not a death
        assert float(wait_s) < 300, wait_s  # the plan's, not --comm-timeout
        waited = rf"(timed out after|failed after waiting at most) {re.escape(wait_s)} s "
        assert re.search(waited, errors[0]), errors[0]
    assert not (tmp_path / "out.jsonl").exists()
