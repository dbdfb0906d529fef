"""The sbatch scripts under a real SLURM: `sbatch --ntasks=2 slurm/<script>` on the bundled model
gives the single process's output. Skipped where `sbatch` is missing or no controller answers.

A single-host SLURM is enough (Debian: `apt-get install slurm-wlm munge`, a munge key, `munged`,
a slurm.conf naming this host with 2 CPUs, then `slurmctld` and `slurmd`); the test jobs ask
for two tasks and nothing else, so they also run on a CPU-only cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB_ARGS = ["--prompt-len", "8", "--num-prompts", "4", "--gen-len", "8", "--comm-timeout", "120"]
JOB_TIMEOUT_S = 600  # an upper bound for a job that never ends, not a measurement


def slurm_answers() -> bool:
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if not slurm_answers():
    pytest.skip("no SLURM here (sbatch missing, or no controller answers scontrol ping)", allow_module_level=True)


def job_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("SLURM_", "SBATCH_", "OMPI_", "PMI_", "PMIX_"))}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
               PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    return env


def run_sbatch(script: str, out: Path, log: Path) -> None:
    """Submit, wait for the end, and fail with the job's log unless it succeeded."""
    cmd = ["sbatch", "--parsable", "--wait", "--ntasks=2", f"--output={log}", str(REPO_ROOT / "slurm" / script),
           *JOB_ARGS, "--output", str(out), "--verbose"]
    proc = subprocess.Popen(cmd, env=job_env(), cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    job_id = proc.stdout.readline().strip().split(";")[0]
    try:
        _, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", job_id], timeout=60)
        proc.kill()
        proc.communicate()
        raise
    text = log.read_text() if log.exists() else "(no job log)"
    assert proc.returncode == 0, f"job {job_id}: {err}\n{text[-3000:]}"


@pytest.fixture(scope="module")
def single_output(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("single") / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "flexgen_dist.run", *JOB_ARGS, "--output", str(out)],
                          env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def mpirun_ready() -> bool:
    if shutil.which("mpirun") is None:
        return False
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "script",
    [
        "one_node_n_gpus.sbatch",
        "n_nodes_one_gpu.sbatch",
        pytest.param("mpirun.sbatch", marks=pytest.mark.skipif(not mpirun_ready(), reason="no mpirun / mpi4py")),
    ],
)
def test_sbatch_two_tasks_match_one_process(tmp_path, single_output, script):
    out, log = tmp_path / "out.jsonl", tmp_path / "job.log"
    run_sbatch(script, out, log)
    assert [json.loads(line) for line in out.read_text().splitlines()] == single_output
    text = log.read_text()
    assert "process group ready: rank 1 of 2" in text, text[-3000:]  # two ranks ran, not one process
    assert text.count("throughput:") == 1  # rank 0 alone prints the summary
