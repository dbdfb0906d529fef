"""DistContext from torchrun / SLURM / MPI environments, host lists, backend choice, real gloo ranks.

Which launcher wins when several left their variables: test_launcher_env.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from flexgen_dist.parallel.context import DistContext, choose_backend, setup_logging
from flexgen_dist.parallel.hostlist import expand_nodelist, first_host
from flexgen_dist.parallel.hostlist import free_port
from flexgen_dist.parallel.mpi import MPI_INSTALL_HINT
from flexgen_dist.parallel.slurm import SLURM_PORT_BASE, SLURM_PORT_SPAN, slurm_job_port
from flexgen_dist.errors import UserError
from launcher_envs import ompi_env, slurm_env, torchrun_env

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- single process ---------------------------------------------------------------------------------


def test_no_launcher_is_single_process():
    ctx = DistContext.from_env({}, cuda_device_count=0)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.launcher) == (0, 1, 0, "single")
    assert ctx.device == "cpu" and ctx.backend == "gloo"
    assert ctx.is_first and ctx.is_last
    ctx.init_process_group(timeout_s=1)  # no-op: no process group for one rank
    ctx.destroy()
    ctx.destroy()


def test_single_process_with_a_gpu():
    ctx = DistContext.from_env({}, cuda_device_count=1)
    assert ctx.device == "cuda:0" and ctx.backend == "nccl"


def test_context_is_frozen():
    ctx = DistContext.from_env({}, cuda_device_count=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.rank = 3  # type: ignore[misc]


def test_from_env_reads_os_environ_by_default(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "PMI_", "MPI_LOCAL")) or name in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    ctx = DistContext.from_env(cuda_device_count=0)
    assert ctx.launcher == "torchrun" and ctx.world_size == 1


# ---- torchrun -----------------------------------------------------------------------------------------


def test_torchrun():
    ctx = DistContext.from_env(torchrun_env(), cuda_device_count=0)
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (1, 4, 1)
    assert (ctx.master_addr, ctx.master_port) == ("10.1.2.3", 29511)
    assert ctx.launcher == "torchrun" and ctx.device == "cpu" and ctx.backend == "gloo"
    assert not ctx.is_first and not ctx.is_last
    assert (ctx.prev_rank, ctx.next_rank) == (0, 2)
    assert ctx.init_method == "tcp://10.1.2.3:29511"


def test_last_rank_sends_back_to_first():
    ctx = DistContext.from_env(torchrun_env(rank=3, local_rank=3), cuda_device_count=0)
    assert ctx.is_last and ctx.next_rank == 0


def test_ipv6_master_address_in_brackets():
    ctx = DistContext.from_env(torchrun_env(MASTER_ADDR="fd00::1"), cuda_device_count=0)
    assert ctx.init_method == "tcp://[fd00::1]:29511"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (torchrun_env(RANK="one"), "RANK='one' is not an integer"),
        (torchrun_env(RANK="4"), "RANK=4 is not below WORLD_SIZE=4"),
        (torchrun_env(RANK="-1"), "RANK=-1 must be at least 0"),
        (torchrun_env(WORLD_SIZE="0", RANK="0"), "WORLD_SIZE=0 must be at least 1"),
        (torchrun_env(LOCAL_RANK="5"), "LOCAL_RANK=5 is not below LOCAL_WORLD_SIZE=4"),
        (torchrun_env(MASTER_PORT="70000"), "MASTER_PORT=70000 is not a TCP port"),
        (torchrun_env(MASTER_PORT="http"), "MASTER_PORT='http' is not an integer"),
        ({k: v for k, v in torchrun_env().items() if k != "MASTER_ADDR"}, "MASTER_ADDR is not set"),
        ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
    ],
)
def test_torchrun_bad_values(env, message):
    with pytest.raises(UserError, match=message) as info:
        DistContext.from_env(env, cuda_device_count=0)
    assert "\n" not in str(info.value)


# ---- backend and device --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local_world_size", "gpus", "backend"),
    [(1, 0, "gloo"), (4, 0, "gloo"), (1, 1, "nccl"), (4, 4, "nccl"), (2, 8, "nccl"), (4, 2, "gloo"), (2, 1, "gloo")],
)
def test_backend_choice(local_world_size, gpus, backend):
    assert choose_backend(local_world_size, gpus) == backend


def test_device_and_backend_from_local_rank():
    env = torchrun_env(rank=6, world_size=8, local_rank=2, local_world_size=4)
    ctx = DistContext.from_env(env, cuda_device_count=4)
    assert (ctx.device, ctx.backend) == ("cuda:2", "nccl")
    shared = DistContext.from_env(env, cuda_device_count=2)  # 4 ranks on 2 GPUs
    assert (shared.device, shared.backend) == ("cuda:0", "gloo")


def test_comm_backend_override():
    ctx = DistContext.from_env(torchrun_env(), cuda_device_count=4, comm_backend="gloo")
    assert (ctx.backend, ctx.device) == ("gloo", "cuda:1")
    with pytest.raises(UserError, match="'nccl' needs CUDA"):
        DistContext.from_env(torchrun_env(), cuda_device_count=0, comm_backend="nccl")
    with pytest.raises(UserError, match="'mpi' is unknown"):
        DistContext.from_env(torchrun_env(), cuda_device_count=0, comm_backend="mpi")


# ---- SLURM ----------------------------------------------------------------------------------------------


def test_slurm():
    ctx = DistContext.from_env(slurm_env(), cuda_device_count=1)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.launcher) == (2, 4, 0, "slurm")
    assert ctx.master_addr == "gpu-node07"
    assert ctx.master_port == slurm_job_port(4242)
    assert (ctx.device, ctx.backend) == ("cuda:0", "nccl")  # one task per node, one GPU each


def test_slurm_port_is_deterministic_and_safe():
    ports = {slurm_job_port(job_id) for job_id in range(0, 10**6, 977)}
    assert all(SLURM_PORT_BASE <= port < SLURM_PORT_BASE + SLURM_PORT_SPAN for port in ports)
    assert max(ports) < 32768  # below the Linux ephemeral range
    assert slurm_job_port(123456) == slurm_job_port(123456) != slurm_job_port(123457)


def test_slurm_master_port_and_addr_from_env_win():
    ctx = DistContext.from_env(slurm_env(MASTER_PORT="31000", MASTER_ADDR="head"), cuda_device_count=0)
    assert (ctx.master_addr, ctx.master_port) == ("head", 31000)


def test_slurm_node_list_fallbacks():
    env = slurm_env()
    del env["SLURM_JOB_NODELIST"]
    env["SLURM_NODELIST"] = "a1,a2"
    assert DistContext.from_env(env, cuda_device_count=0).master_addr == "a1"
    env["SLURM_STEP_NODELIST"] = "b[3-4]"  # the step may run on a subset of the job's nodes
    assert DistContext.from_env(env, cuda_device_count=0).master_addr == "b3"
    del env["SLURM_NODELIST"], env["SLURM_STEP_NODELIST"]
    with pytest.raises(UserError, match="SLURM_JOB_NODELIST is not set"):
        DistContext.from_env(env, cuda_device_count=0)


def test_slurm_step_tasks_win_over_job_tasks():
    env = slurm_env(procid=1, ntasks=8, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2", SLURM_NODEID="0")
    ctx = DistContext.from_env(env, cuda_device_count=2)
    assert ctx.world_size == 2 and ctx.backend == "nccl"


def test_slurm_tasks_per_node_picks_this_node():
    # 2 tasks on nodes 0-2, 1 task on node 3: this task is alone on node 3 with one GPU.
    env = slurm_env(procid=6, ntasks=7, SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_NODEID="3")
    assert DistContext.from_env(env, cuda_device_count=1).backend == "nccl"
    env.update(SLURM_NODEID="0", SLURM_PROCID="1", SLURM_LOCALID="1")
    assert DistContext.from_env(env, cuda_device_count=1).backend == "gloo"  # two tasks share a GPU
    env["SLURM_STEP_TASKS_PER_NODE"] = "two"
    with pytest.raises(UserError, match="SLURM_STEP_TASKS_PER_NODE='two'"):
        DistContext.from_env(env, cuda_device_count=1)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (slurm_env(SLURM_PROCID="x"), "SLURM_PROCID='x' is not an integer"),
        (slurm_env(procid=4), "SLURM_PROCID=4 is not below SLURM_NTASKS=4"),
        (slurm_env(SLURM_NTASKS="0", SLURM_PROCID="0"), "SLURM_NTASKS=0 must be at least 1"),
        (slurm_env(localid=3, SLURM_STEP_TASKS_PER_NODE="2"), "SLURM_LOCALID=3 is not below"),
        (slurm_env(SLURM_JOB_NODELIST="node[1-"), "SLURM_JOB_NODELIST='node\\[1-' has unbalanced brackets"),
    ],
)
def test_slurm_bad_values(env, message):
    with pytest.raises(UserError, match=message):
        DistContext.from_env(env, cuda_device_count=0)


# ---- host lists -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node01", ["node01"]),
        ("host1,host2", ["host1", "host2"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        (
            "node[01-04,07],gpu-a[3,5-6]",
            ["node01", "node02", "node03", "node04", "node07", "gpu-a3", "gpu-a5", "gpu-a6"],
        ),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("login,c[1-2],gpu[007]", ["login", "c1", "c2", "gpu007"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("a[1-2]b,c", ["a1b", "a2b", "c"]),
        (" node[3] ", ["node3"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("nodelist", ["", "node[1-", "node1]", "node[[1]]", "node[a-b]", "node[5-3]", "a,,b", "node[]"])
def test_expand_nodelist_rejects(nodelist):
    with pytest.raises(UserError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(nodelist)


# ---- MPI ---------------------------------------------------------------------------------------------------


class FakeComm:
    """Stands in for mpi4py's COMM_WORLD as seen from one rank."""

    def __init__(self, rank, size, hostnames, from_root=None):
        self.rank, self.size, self.hostnames, self.from_root = rank, size, hostnames, from_root
        self.bcast_sent = None

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def allgather(self, value):
        return list(self.hostnames)

    def bcast(self, value, root=0):
        if self.rank == root:
            self.bcast_sent = value
            return value
        return self.from_root

    def Split_type(self, split_type, key=0):
        return FakeComm(self.rank, self.size, self.hostnames)  # everyone on one node

    def Free(self):
        pass


def install_fake_mpi4py(monkeypatch, comm):
    mpi = types.SimpleNamespace(COMM_WORLD=comm, COMM_TYPE_SHARED=1)
    package = types.ModuleType("mpi4py")
    package.MPI = mpi  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mpi4py", package)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)


def test_mpi_rank0_picks_loopback_and_a_port_on_one_node(monkeypatch):
    comm = FakeComm(0, 2, ["h", "h"])
    install_fake_mpi4py(monkeypatch, comm)
    ctx = DistContext.from_env(ompi_env(rank=0, local_rank=0), cuda_device_count=0)
    assert (ctx.launcher, ctx.rank, ctx.world_size, ctx.master_addr) == ("mpi", 0, 2, "127.0.0.1")
    assert comm.bcast_sent == ("127.0.0.1", ctx.master_port) and 1 <= ctx.master_port <= 65535


def test_mpi_other_rank_takes_what_rank0_broadcast(monkeypatch):
    install_fake_mpi4py(monkeypatch, FakeComm(1, 2, ["h0", "h1"], from_root=("10.0.0.5", 41000)))
    ctx = DistContext.from_env(ompi_env(rank=1, local_rank=0, local_size=1), cuda_device_count=1)
    assert (ctx.master_addr, ctx.master_port) == ("10.0.0.5", 41000)
    assert (ctx.device, ctx.backend) == ("cuda:0", "nccl")


def test_mpi_rank0_on_several_nodes_broadcasts_a_reachable_name(monkeypatch):
    comm = FakeComm(0, 2, ["h0", "h1"])
    install_fake_mpi4py(monkeypatch, comm)
    ctx = DistContext.from_env(ompi_env(rank=0, local_rank=0, local_size=1, MASTER_PORT="25000"), cuda_device_count=0)
    assert ctx.master_port == 25000 and comm.bcast_sent == (ctx.master_addr, 25000)
    assert ctx.master_addr and not ctx.master_addr.startswith("127.")


def test_mpich_variables_and_local_rank_from_mpi(monkeypatch):
    install_fake_mpi4py(monkeypatch, FakeComm(1, 3, ["h"] * 3, from_root=("h", 40000)))
    ctx = DistContext.from_env({"PMI_RANK": "1", "PMI_SIZE": "3"}, cuda_device_count=0)
    assert (ctx.launcher, ctx.rank, ctx.world_size, ctx.local_rank) == ("mpi", 1, 3, 1)
    env = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1",
           "MASTER_ADDR": "h", "MASTER_PORT": "40000"}
    ctx = DistContext.from_env(env, cuda_device_count=1)
    assert (ctx.rank, ctx.local_rank, ctx.backend) == (2, 0, "nccl")


def test_mpi_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(UserError, match="pip install 'flexgen_dist\\[mpi\\]'") as info:
        DistContext.from_env(ompi_env(), cuda_device_count=0)
    assert MPI_INSTALL_HINT in str(info.value)


def test_mpi_with_address_given_needs_no_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    ctx = DistContext.from_env(ompi_env(MASTER_ADDR="n1", MASTER_PORT="24000"), cuda_device_count=0)
    assert (ctx.rank, ctx.master_addr, ctx.master_port) == (1, "n1", 24000)


def test_mpi4py_of_another_mpi_is_reported(monkeypatch):
    install_fake_mpi4py(monkeypatch, FakeComm(0, 1, ["h"]))  # a singleton: the wrong MPI library
    with pytest.raises(UserError, match="another MPI"):
        DistContext.from_env(ompi_env(), cuda_device_count=0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (ompi_env(rank=2, size=2), "OMPI_COMM_WORLD_RANK=2 is not below OMPI_COMM_WORLD_SIZE=2"),
        (ompi_env(OMPI_COMM_WORLD_SIZE="two"), "OMPI_COMM_WORLD_SIZE='two' is not an integer"),
        ({"PMI_RANK": "0"}, "PMI_RANK is set but PMI_SIZE is not"),
    ],
)
def test_mpi_bad_values(env, message):
    with pytest.raises(UserError, match=message):
        DistContext.from_env(env, cuda_device_count=0)


# ---- logging ------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_setup_logging_rank_and_levels(restore_root_logger, capsys):
    rank1 = DistContext.from_env(torchrun_env(), cuda_device_count=0)
    setup_logging(rank1, verbose=False)
    root = logging.getLogger()
    assert root.level == logging.WARNING
    setup_logging(rank1, verbose=True)
    assert root.level == logging.DEBUG
    ours = [handler for handler in root.handlers if getattr(handler, "_flexgen_dist", False)]
    assert len(ours) == 1  # set up twice, one handler
    rank0 = DistContext.from_env(torchrun_env(rank=0, local_rank=0), cuda_device_count=0)
    setup_logging(rank0, verbose=False)
    assert root.level == logging.INFO
    logging.getLogger("flexgen_dist.test").info("hello")
    assert "[rank 0/4] INFO flexgen_dist.test: hello" in capsys.readouterr().err


# ---- real processes --------------------------------------------------------------------------------------------

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from flexgen_dist.parallel.context import DistContext

    ctx = DistContext.from_env(cuda_device_count=0)
    ctx.init_process_group(timeout_s=60)
    if ctx.rank == 0:
        dist.send(torch.arange(4, dtype=torch.float32) * 10, dst=1)
        got = []
    else:
        buf = torch.empty(4)
        dist.recv(buf, src=0)
        got = buf.tolist()
    total = torch.tensor([ctx.rank + 1.0])
    dist.all_reduce(total)
    ctx.destroy()
    ctx.destroy()
    print(json.dumps({"rank": ctx.rank, "world": ctx.world_size, "launcher": ctx.launcher,
                      "backend": ctx.backend, "got": got, "sum": total.item(),
                      "initialized": dist.is_initialized()}))
    """
)


def clean_env(**extra):
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL"))
        and name not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def parse_results(outputs):
    results = sorted((json.loads(line) for out in outputs for line in out.splitlines() if line.startswith("{")),
                     key=lambda result: result["rank"])
    return results


def check_two_ranks(results, launcher):
    assert [result["rank"] for result in results] == [0, 1]
    for result in results:
        assert (result["world"], result["launcher"], result["backend"]) == (2, launcher, "gloo")
        assert result["sum"] == 3.0 and result["initialized"] is False
    assert results[1]["got"] == [0.0, 10.0, 20.0, 30.0]


@pytest.mark.dist
def test_two_gloo_ranks_from_torchrun_env():
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT],
            env=clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    check_two_ranks(parse_results(outputs), "torchrun")


def mpi4py_available():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.dist
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not on PATH")
@pytest.mark.skipif(not mpi4py_available(), reason="mpi4py is not installed")
def test_two_gloo_ranks_under_mpirun():
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = ["--allow-run-as-root", "--oversubscribe"] if "Open MPI" in version else []
    proc = subprocess.run(
        ["mpirun", "-np", "2", *flags, sys.executable, "-c", RANK_SCRIPT],
        env=clean_env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    check_two_ranks(parse_results([proc.stdout]), "mpi")


# ---- one GPU per task (srun --gpus-per-task=1, --gpu-bind) ---------------------------------------------


@pytest.fixture
def visible_gpus(monkeypatch):
    """Fakes what torch sees: `visible_gpus(n)` makes n CUDA devices visible to this process."""

    def make(count: int) -> None:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    return make


def _slurm_node_of(tasks: int, localid: int, **extra) -> dict:
    """srun task `localid` of `tasks` tasks on the first node of the step."""
    return slurm_env(procid=localid, ntasks=tasks, localid=localid, SLURM_NODEID="0",
                     SLURM_STEP_TASKS_PER_NODE=str(tasks), **extra)


@pytest.mark.parametrize("binding", [
    {"SLURM_GPUS_PER_TASK": "1"},  # srun --gpus-per-task=1 (binds each task to its GPU since Slurm 21.08)
    {"SLURM_GPUS_PER_TASK": "a100:1"},
    {"SLURM_TRES_PER_TASK": "cpu=4,gres/gpu=1"},  # Slurm 23.11+ spells --gpus-per-task this way
    {"SLURM_GPU_BIND": "map_gpu:0,1,2,3"},  # srun --gpu-bind=map_gpu:...
    {"SLURM_GPU_BIND": "verbose,single:1"},
])
@pytest.mark.parametrize("localid", [1, 3])
def test_a_task_bound_to_its_own_gpu_uses_nccl_on_cuda0(visible_gpus, binding, localid):
    visible_gpus(1)  # CUDA_VISIBLE_DEVICES names this task's GPU only
    ctx = DistContext.from_env(_slurm_node_of(4, localid, CUDA_VISIBLE_DEVICES=str(localid), **binding))
    assert (ctx.local_rank, ctx.local_world_size) == (localid, 4)
    assert (ctx.backend, ctx.device) == ("nccl", "cuda:0")


def test_tasks_bound_to_two_gpus_each_use_the_first_of_theirs(visible_gpus):
    visible_gpus(2)
    ctx = DistContext.from_env(_slurm_node_of(4, 3, SLURM_GPUS_PER_TASK="2", CUDA_VISIBLE_DEVICES="6,7"))
    assert (ctx.backend, ctx.device) == ("nccl", "cuda:0")


def test_tasks_that_see_every_gpu_of_the_node_pick_theirs_by_local_rank(visible_gpus):
    visible_gpus(4)
    for localid in range(4):
        ctx = DistContext.from_env(_slurm_node_of(4, localid, CUDA_VISIBLE_DEVICES="0,1,2,3"))
        assert (ctx.backend, ctx.device) == ("nccl", f"cuda:{localid}")


@pytest.mark.parametrize("binding", [{}, {"SLURM_GPU_BIND": "none", "SLURM_GPUS_PER_TASK": "1"},
                                     {"SLURM_TRES_PER_TASK": "cpu=4"}, {"SLURM_GPU_BIND": "closest"}])
def test_two_tasks_sharing_one_gpu_use_gloo(visible_gpus, binding):
    visible_gpus(1)  # srun --gres=gpu:1 --ntasks-per-node=2: both tasks see the node's one GPU
    ctx = DistContext.from_env(_slurm_node_of(2, 1, CUDA_VISIBLE_DEVICES="0", **binding))
    assert (ctx.backend, ctx.device) == ("gloo", "cuda:0")


@pytest.mark.parametrize("binding", [{}, {"SLURM_GPUS_PER_TASK": "1"}])
def test_no_gpu_is_gloo_on_the_cpu(visible_gpus, binding):
    visible_gpus(0)
    ctx = DistContext.from_env(_slurm_node_of(2, 1, **binding))
    assert (ctx.backend, ctx.device) == ("gloo", "cpu")


def test_gpu_binding_of_an_outer_srun_is_not_read_under_torchrun(visible_gpus):
    # torchrun inside `srun --gpus-per-task=1`: its workers share the one GPU the srun task got
    visible_gpus(1)
    ctx = DistContext.from_env(torchrun_env(rank=1, world_size=2, local_rank=1, local_world_size=2,
                                            **_slurm_node_of(1, 0, SLURM_GPUS_PER_TASK="1")))
    assert (ctx.launcher, ctx.backend, ctx.device) == ("torchrun", "gloo", "cuda:0")
