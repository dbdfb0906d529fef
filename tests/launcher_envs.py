"""Launcher environments for the DistContext tests: what torchrun, srun, mpirun and an sbatch
batch step set. The SLURM ones follow what Slurm 22.05 set in a real `sbatch --ntasks=2` job on
one host (the batch script's own environment, an `srun` task's, and an `mpirun` rank's), trimmed
to the variables that matter and with the node list of a bigger cluster."""

from __future__ import annotations


def torchrun_env(rank=1, world_size=4, local_rank=1, local_world_size=4, **extra):
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": "10.1.2.3",
        "MASTER_PORT": "29511",
    }
    env.update(extra)
    return env


def sbatch_batch_step_env(ntasks=2, **extra):
    """The batch script's environment: SLURM_PROCID=0 and the allocation's SLURM_NTASKS, but no
    SLURM_STEP_ID (the batch step is not an srun step). Every process the script starts without
    srun inherits exactly this, whatever its rank."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOBID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NPROCS": str(ntasks),
        "SLURM_GTIDS": "0",
        "SLURM_JOB_NODELIST": "gpu-node[07-10]",
        "SLURM_NODELIST": "gpu-node[07-10]",
        "SLURM_TASKS_PER_NODE": str(ntasks),
        "SLURM_CPUS_ON_NODE": "2",
    }
    env.update(extra)
    return env


def slurm_env(procid=2, ntasks=4, localid=0, **extra):
    """An srun task: the step variables (SLURM_STEP_ID, SLURM_STEP_NUM_TASKS, ...) describe the ranks."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_STEPID": "0",
        "SLURM_PROCID": str(procid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(procid),
        "SLURM_JOB_NODELIST": "gpu-node[07-10]",
        "SLURM_STEP_TASKS_PER_NODE": f"1(x{ntasks})",
    }
    env.update(extra)
    return env


def ompi_env(rank=1, size=2, local_rank=1, local_size=2, **extra):
    """What Open MPI's mpirun (5.x: prterun) sets in each rank, PMIx variables included."""
    env = {
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_SIZE": str(size),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(local_rank),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size),
        "OMPI_COMM_WORLD_NODE_RANK": str(local_rank),
        "PMIX_RANK": str(rank),
        "PMIX_NAMESPACE": "prterun-vm-8356@1",
    }
    env.update(extra)
    return env
