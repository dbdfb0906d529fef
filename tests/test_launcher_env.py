"""Which launcher wins when several left their variables: the innermost one, and every rank of one
launch must agree (one rank choosing SLURM's rendezvous and another MPI's never meet)."""

from __future__ import annotations

import logging
import sys

import pytest

from flexgen_dist.errors import UserError
from flexgen_dist.parallel.context import DistContext
from flexgen_dist.parallel.launchers import torchrun_agent_serves_store
from flexgen_dist.parallel.slurm import slurm_job_port
from launcher_envs import ompi_env, sbatch_batch_step_env, slurm_env, torchrun_env


@pytest.fixture
def no_mpi4py(monkeypatch):
    """The paths tested here must not need mpi4py (its import would fail)."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)


def contexts(envs):
    return [DistContext.from_env(env, cuda_device_count=0) for env in envs]


# ---- mpirun in an sbatch script (the batch step) -----------------------------------------------------------


@pytest.mark.parametrize("size", [2, 4])
def test_mpirun_in_the_batch_step_every_rank_chooses_mpi(no_mpi4py, size):
    # Each rank inherits the batch step's SLURM_PROCID=0 and SLURM_NTASKS=size: rank 0's MPI
    # numbers agree with them, the others' do not. All must still choose MPI's rendezvous.
    given = {"MASTER_ADDR": "gpu-node07", "MASTER_PORT": "23000"}  # so that no mpi4py is needed
    envs = [{**sbatch_batch_step_env(ntasks=size), **ompi_env(rank=rank, size=size, local_rank=rank,
                                                             local_size=size, **given)} for rank in range(size)]
    ctxs = contexts(envs)
    assert [ctx.launcher for ctx in ctxs] == ["mpi"] * size
    assert [ctx.rank for ctx in ctxs] == list(range(size))
    assert {(ctx.world_size, ctx.master_addr, ctx.master_port) for ctx in ctxs} == {(size, "gpu-node07", 23000)}


def test_mpich_in_the_batch_step_chooses_mpi(no_mpi4py):
    env = {**sbatch_batch_step_env(ntasks=2), "PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0",
           "MPI_LOCALNRANKS": "2", "MASTER_ADDR": "h", "MASTER_PORT": "23001"}
    assert DistContext.from_env(env, cuda_device_count=0).launcher == "mpi"


def test_mpirun_ranks_under_its_srun_started_daemons_choose_mpi(no_mpi4py):
    # mpirun over 2 nodes in an sbatch job: ranks 0-1 run under mpirun in the batch step, ranks
    # 2-3 under a daemon that mpirun started with srun (a 1-task step: SLURM_PROCID=0 of 1).
    given = {"MASTER_ADDR": "gpu-node07", "MASTER_PORT": "23002"}
    head = [{**sbatch_batch_step_env(ntasks=4), **ompi_env(rank=rank, size=4, local_rank=rank, **given)}
            for rank in (0, 1)]
    daemon_step = slurm_env(procid=0, ntasks=1, SLURM_STEP_ID="1", SLURM_STEP_NUM_TASKS="1", SLURM_NODEID="1",
                            SLURM_STEP_TASKS_PER_NODE="1")
    remote = [{**daemon_step, **ompi_env(rank=rank, size=4, local_rank=rank - 2, **given)} for rank in (2, 3)]
    assert [ctx.launcher for ctx in contexts(head + remote)] == ["mpi"] * 4


# ---- srun ------------------------------------------------------------------------------------------------------


def test_srun_step_chooses_slurm_on_every_rank(no_mpi4py):
    ctxs = contexts([slurm_env(procid=rank, ntasks=4) for rank in range(4)])
    assert [(ctx.launcher, ctx.rank) for ctx in ctxs] == [("slurm", rank) for rank in range(4)]
    assert {(ctx.master_addr, ctx.master_port) for ctx in ctxs} == {("gpu-node07", slurm_job_port(4242))}


@pytest.mark.parametrize(
    "mpi_vars",
    [
        # srun --mpi=pmi2 (seen on Slurm 22.05): PMI_RANK / PMI_SIZE / PMI_FD, equal to SLURM's
        lambda rank: {"PMI_RANK": str(rank), "PMI_SIZE": "2", "PMI_FD": "11", "PMI_JOBID": "7.0"},
        # srun --mpi=pmix: the PMIx server's variables, no OMPI_* / PMI_SIZE
        lambda rank: {"PMIX_RANK": str(rank), "PMIX_NAMESPACE": "slurm.pmix.7.0", "PMIX_SERVER_URI41": "x"},
        # an Open MPI built with SLURM's PMIx support and started by srun, with OMPI_* set alike
        lambda rank: ompi_env(rank=rank, size=2, local_rank=0, local_size=1),
    ],
    ids=["pmi2", "pmix", "ompi"],
)
def test_srun_with_an_mpi_plugin_chooses_slurm(no_mpi4py, mpi_vars):
    ctxs = contexts([{**slurm_env(procid=rank, ntasks=2), **mpi_vars(rank)} for rank in range(2)])
    assert [(ctx.launcher, ctx.rank, ctx.master_addr) for ctx in ctxs] == [("slurm", 0, "gpu-node07"),
                                                                         ("slurm", 1, "gpu-node07")]


def test_mpirun_inside_an_srun_step_chooses_mpi(no_mpi4py):
    # `srun -n1 mpirun -np 2 ...`: one srun task, two MPI ranks.
    step = slurm_env(procid=0, ntasks=1, SLURM_STEP_NUM_TASKS="1", SLURM_STEP_TASKS_PER_NODE="1", SLURM_NODEID="0")
    given = {"MASTER_ADDR": "h", "MASTER_PORT": "23003"}
    ctxs = contexts([{**step, **ompi_env(rank=rank, size=2, local_rank=rank, **given)} for rank in range(2)])
    assert [ctx.launcher for ctx in ctxs] == ["mpi", "mpi"]


@pytest.mark.parametrize("step_id", ["4294967291", "4294967292", "4294967290", "batch", "extern"])
def test_slurm_special_steps_are_not_srun(no_mpi4py, step_id):
    # The batch, extern and interactive steps have ids from 0xFFFFFFF0 up; they launch no ranks.
    env = sbatch_batch_step_env(ntasks=1, SLURM_STEP_ID=step_id)
    assert DistContext.from_env(env, cuda_device_count=0).launcher == "single"


# ---- torchrun ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slurm", [sbatch_batch_step_env(ntasks=1), slurm_env(procid=0, ntasks=1)],
                         ids=["batch-step", "srun-step"])
def test_torchrun_inside_slurm_chooses_torchrun(no_mpi4py, slurm):
    # torchrun in an sbatch script, or started by srun (one per node): its RANK / WORLD_SIZE win.
    ctxs = contexts([{**slurm, **torchrun_env(rank=rank, local_rank=rank)} for rank in range(4)])
    assert [(ctx.launcher, ctx.rank, ctx.world_size) for ctx in ctxs] == [("torchrun", rank, 4) for rank in range(4)]
    assert {ctx.master_addr for ctx in ctxs} == {"10.1.2.3"}


def test_torchrun_agent_store_is_recognised():
    # torchrun sets TORCHELASTIC_USE_AGENT_STORE=True when its agent serves the store at
    # MASTER_PORT (rank 0 must then join it); RANK / WORLD_SIZE set by hand do not.
    assert torchrun_agent_serves_store(torchrun_env(TORCHELASTIC_USE_AGENT_STORE="True"))
    assert not torchrun_agent_serves_store(torchrun_env(TORCHELASTIC_USE_AGENT_STORE="False"))
    assert not torchrun_agent_serves_store(torchrun_env())


# ---- no launcher in the batch step -----------------------------------------------------------------------------


def test_plain_python_in_the_batch_step_is_one_process_with_a_warning(no_mpi4py, caplog):
    # `python -m flexgen_dist.run` in an sbatch --ntasks=4 script without srun: one process, not
    # rank 0 of 4 waiting for three ranks that will never start.
    with caplog.at_level(logging.WARNING, logger="flexgen_dist.parallel.launchers"):
        ctx = DistContext.from_env(sbatch_batch_step_env(ntasks=4), cuda_device_count=0)
    assert (ctx.launcher, ctx.world_size) == ("single", 1)
    assert "SLURM_NTASKS=4" in caplog.text and "srun" in caplog.text


def test_batch_step_of_one_task_is_quiet(no_mpi4py, caplog):
    with caplog.at_level(logging.WARNING, logger="flexgen_dist.parallel.launchers"):
        ctx = DistContext.from_env(sbatch_batch_step_env(ntasks=1), cuda_device_count=0)
    assert ctx.launcher == "single" and caplog.text == ""


def test_batch_step_without_ntasks_is_one_process(no_mpi4py, caplog):
    # `sbatch job.sh` without --ntasks: slurmd sets SLURM_NTASKS only when the job asked for a task
    # count, and slurmstepd sets SLURM_PROCID=0 in the batch step: a plain run there is one process.
    env = {key: value for key, value in sbatch_batch_step_env().items() if key not in ("SLURM_NTASKS", "SLURM_NPROCS")}
    with caplog.at_level(logging.WARNING, logger="flexgen_dist.parallel.launchers"):
        ctx = DistContext.from_env(env, cuda_device_count=0)
    assert (ctx.launcher, ctx.world_size) == ("single", 1) and caplog.text == ""


@pytest.mark.parametrize("drop", [(), ("SLURM_NTASKS", "SLURM_NPROCS")], ids=["with-ntasks", "without-ntasks"])
def test_a_task_past_the_first_outside_srun_is_refused(no_mpi4py, drop):
    # Only srun starts task N > 0, and it sets SLURM_STEP_ID: without one, running as one process
    # would silently repeat rank 0's whole run.
    env = {key: value for key, value in sbatch_batch_step_env(ntasks=4, SLURM_PROCID="2").items() if key not in drop}
    with pytest.raises(UserError, match=r"^SLURM_PROCID=2 but this process is not in an srun step \(no SLURM_STEP_ID\)"):
        DistContext.from_env(env, cuda_device_count=0)
