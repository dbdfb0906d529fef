"""Reading SLURM's environment under srun: ranks, tasks per node, rank 0's address (from the
node list, hostlist.py), a port derived from the job id, and whether srun bound GPUs to tasks.

`DistContext.from_env` (context.py) calls `_slurm_ranks` when launchers.py finds an srun step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from flexgen_dist.errors import UserError

from .hostlist import first_host
from .launchers import DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, _check_rank, _env_int, _first_present, _port, _Ranks

# Ports derived from SLURM_JOB_ID: above the well-known and common service ports, below the
# Linux ephemeral range (32768+), so they do not collide with ports the OS hands out.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000


def _slurm_ranks(env: Mapping[str, str]) -> _Ranks:
    # Under srun the SLURM_STEP_* variables describe the step (the ranks); SLURM_NTASKS may describe
    # the whole allocation.
    size_var = _first_present(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"))
    if size_var is None:
        raise UserError("SLURM_PROCID is set but SLURM_NTASKS is not: start the ranks with srun")
    world_size = _env_int(env, size_var, minimum=1)
    rank = _env_int(env, "SLURM_PROCID")
    _check_rank(rank, "SLURM_PROCID", world_size, size_var)
    local_rank = _env_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    local_world_size, local_size_var = _slurm_local_world_size(env, world_size, size_var)
    _check_rank(local_rank, "SLURM_LOCALID", local_world_size, local_size_var)

    if env.get("MASTER_ADDR"):
        master_addr = env["MASTER_ADDR"]
    else:
        list_var = _first_present(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
        if list_var is None:
            if world_size > 1:
                raise UserError(
                    f"{size_var}={world_size} but SLURM_JOB_NODELIST is not set: set MASTER_ADDR to rank 0's host"
                )
            master_addr = DEFAULT_MASTER_ADDR
        else:
            master_addr = first_host(env[list_var], var=list_var)

    if env.get("MASTER_PORT"):
        master_port = _port(env, "MASTER_PORT")
    elif env.get("SLURM_JOB_ID"):
        master_port = slurm_job_port(_env_int(env, "SLURM_JOB_ID"))
    else:
        master_port = DEFAULT_MASTER_PORT
    return _Ranks(rank, world_size, local_rank, local_world_size, master_addr, master_port,
                  gpus_bound=_slurm_binds_gpus(env, local_world_size))


def _slurm_binds_gpus(env: Mapping[str, str], local_world_size: int) -> bool:
    """srun gave each task GPUs of its own (CUDA_VISIBLE_DEVICES names only them): `--gpus-per-task`
    (SLURM_GPUS_PER_TASK, or SLURM_TRES_PER_TASK="...,gres/gpu=N" since Slurm 23.11; it implies
    `--gpu-bind=per_task:N`) or a `--gpu-bind` that gives each task GPUs no other task has
    (SLURM_GPU_BIND: per_task:N, single:1, map_gpu with a GPU per local task). `--gpu-bind=none`
    or `closest`, and no such variable, bind nothing: the tasks may share what they see."""
    # e.g. "verbose,map_gpu:0,1"
    bind = re.sub(r"^((verbose|quiet),)+", "", env.get("SLURM_GPU_BIND", "").strip().lower())
    kind, _, value = bind.partition(":")
    if kind == "none":
        return False
    if kind == "per_task" or (kind == "single" and value.strip() == "1"):
        return True
    if kind == "map_gpu":  # local task i gets entry i, the list reused in turn when it is shorter
        gpus = [gpu.strip() for gpu in value.split(",")][:local_world_size]
        return len(gpus) == local_world_size and len(set(gpus)) == len(gpus)
    per_task = re.search(r"(\d+)\s*$", env.get("SLURM_GPUS_PER_TASK", ""))  # "1" or "a100:1"
    if per_task is not None and int(per_task.group(1)) >= 1:
        return True
    tres = re.search(r"gres/gpu(?::[\w.-]+)?[=:](\d+)", env.get("SLURM_TRES_PER_TASK", ""))
    return tres is not None and int(tres.group(1)) >= 1


def slurm_job_port(job_id: int) -> int:
    """A port every task of a job derives alike, so two jobs sharing a node rarely collide."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _slurm_local_world_size(env: Mapping[str, str], world_size: int, size_var: str) -> tuple[int, str]:
    """Tasks on this node, from e.g. SLURM_STEP_TASKS_PER_NODE="2(x3),1" and SLURM_NODEID.

    Returns the count and the variable it came from. Without either variable every task may be on
    this node (the cautious assumption: it can only turn nccl into gloo).
    """
    var = _first_present(env, ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    if var is None:
        return world_size, size_var
    counts: list[int] = []
    for part in env[var].split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise UserError(f"{var}={env[var]!r} is not a list like '2(x3),1'")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    node_id = env.get("SLURM_NODEID", "").strip()
    if node_id.isdigit() and int(node_id) < len(counts):
        return counts[int(node_id)], var
    return max(counts), var
