"""Reading each launcher's environment: which launcher started this process, and torchrun's
variables (SLURM's are read in slurm.py, its node lists in hostlist.py; MPI's in mpi.py).

`DistContext.from_env` (context.py) picks the launcher and calls its reader (`RANK_READERS`: the
reader's module is imported only when its launcher started this process); nothing else in
flexgen_dist reads these variables.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from flexgen_dist.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500

# launcher -> the module of flexgen_dist.parallel and its function that read this rank's place from
# the environment, imported by DistContext.from_env when that launcher started the process: a
# single process reads none of them (and loads neither SLURM's node lists nor mpi4py's glue).
RANK_READERS = {"torchrun": ("launchers", "_torchrun_ranks"), "slurm": ("slurm", "_slurm_ranks"),
                "mpi": ("mpi", "_mpi_ranks")}


# ---- launcher detection ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ranks:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    gpus_bound: bool = False  # the launcher gave each task GPUs of its own: all this process sees are its


class _MpiVars(NamedTuple):
    """The variable names one MPI launcher sets; the first name present is read."""

    rank: str
    size: str
    local_rank: tuple[str, ...]
    local_size: tuple[str, ...]


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE")
# The first family whose rank variable is set wins.
_MPI_FAMILIES = (
    _MpiVars("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",),
             ("OMPI_COMM_WORLD_LOCAL_SIZE",)),  # Open MPI
    _MpiVars("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"),
             ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")),  # MPICH / Hydra, Intel MPI, MVAPICH
)


# SLURM sets SLURM_STEP_ID (older versions also SLURM_STEPID) in the tasks of an srun step. The
# batch script itself (the "batch step") has neither, yet it has SLURM_PROCID=0 and the allocation's
# SLURM_NTASKS, and so has every process it starts without srun (mpirun's ranks included).
_SLURM_STEP_VARS = ("SLURM_STEP_ID", "SLURM_STEPID")
# Step ids from here up are SLURM's special steps (interactive, batch, extern, pending), not srun's.
_SLURM_SPECIAL_STEP_IDS = 0xFFFFFFF0


def _detect_launcher(env: Mapping[str, str]) -> str:
    """The innermost launcher of this process: "torchrun", "slurm", "mpi" or "single".

    Every rank of one launch must reach the same answer, so the rules read what all of them see
    alike: which variables are present, and the world sizes. Only the srun-step rule also compares
    this rank's numbers, and there srun set both families itself, consistently, on every rank.
    """
    present = [name for name in _TORCHRUN_VARS if name in env]
    if present:
        missing = [name for name in _TORCHRUN_VARS if name not in env]
        if missing:
            raise UserError(
                f"{present[0]} is set but {missing[0]} is not: set both (torchrun sets them) or neither"
            )
        return "torchrun"  # nothing else sets RANK: torchrun is innermost wherever it runs
    mpi_family = _mpi_family(env)
    if _in_srun_step(env) and (mpi_family is None or not _mpi_contradicts_slurm(env, mpi_family)):
        return "slurm"  # srun; with --mpi=pmi2 / pmix it also sets MPI's variables, consistently
    if mpi_family is not None:
        # mpirun in an sbatch script (the SLURM_* variables describe the batch step), or on a
        # node where mpirun's daemons were started by srun (a step of fewer tasks than ranks)
        return "mpi"
    procid = env.get("SLURM_PROCID", "0").strip()
    if procid != "0":
        # Only srun starts tasks past the first, and it sets SLURM_STEP_ID; a batch script (the batch
        # step, where SLURM_PROCID=0 and SLURM_NTASKS only with --ntasks) runs one process. Rank N
        # outside a step would silently redo rank 0's whole run.
        raise UserError(
            f"SLURM_PROCID={procid} but this process is not in an srun step (no SLURM_STEP_ID): start the ranks "
            "with srun python -m flexgen_dist.run ..., or unset SLURM_PROCID to run one process"
        )
    if "SLURM_PROCID" in env and env.get("SLURM_NTASKS", "1").strip() not in ("", "1"):
        logger.warning(
            "SLURM_NTASKS=%s but this process was not started by srun (no SLURM_STEP_ID): running as one "
            "process; to run %s ranks, start them with: srun python -m flexgen_dist.run ...",
            env["SLURM_NTASKS"].strip(), env["SLURM_NTASKS"].strip(),
        )
    return "single"


def _in_srun_step(env: Mapping[str, str]) -> bool:
    if "SLURM_PROCID" not in env:
        return False
    step_var = _first_present(env, _SLURM_STEP_VARS)
    if step_var is None:
        return False
    step_id = env[step_var].strip()
    return step_id.isdigit() and int(step_id) < _SLURM_SPECIAL_STEP_IDS  # "batch", "extern": not srun


def _mpi_family(env: Mapping[str, str]) -> _MpiVars | None:
    for family in _MPI_FAMILIES:
        if family.rank in env:
            return family
    return None


def _mpi_contradicts_slurm(env: Mapping[str, str], family: _MpiVars) -> bool:
    """MPI's rank or size differs from the srun step's: an MPI launcher runs inside the step."""
    rank_var, size_var = family.rank, family.size
    slurm_size_var = _first_present(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"))
    if env.get(rank_var, "").strip() != env.get("SLURM_PROCID", "").strip():
        return True
    return slurm_size_var is not None and size_var in env and env[size_var].strip() != env[slurm_size_var].strip()


# ---- torchrun ---------------------------------------------------------------------------------------


def _torchrun_ranks(env: Mapping[str, str]) -> _Ranks:
    world_size = _env_int(env, "WORLD_SIZE", minimum=1)
    rank = _env_int(env, "RANK")
    _check_rank(rank, "RANK", world_size, "WORLD_SIZE")
    if world_size > 1:
        for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name):
                raise UserError(f"WORLD_SIZE={world_size} but {name} is not set: start the ranks with torchrun")
    local_rank = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    # Without LOCAL_WORLD_SIZE assume every rank may be on this node (the cautious choice: gloo).
    local_size_var = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in env else "WORLD_SIZE"
    local_world_size = _env_int(env, local_size_var, minimum=1)
    _check_rank(local_rank, "LOCAL_RANK", local_world_size, local_size_var)
    return _Ranks(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=env.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
        master_port=_port(env, "MASTER_PORT") if env.get("MASTER_PORT") else DEFAULT_MASTER_PORT,
    )


def torchrun_agent_serves_store(env: Mapping[str, str]) -> bool:
    """torchrun's agent already serves the rendezvous store at MASTER_ADDR:MASTER_PORT.

    Then every rank, rank 0 included, must join it as a client. torch's C++ TCPStore reads the
    same variable (and then ignores its failed bind, logging an error line), so this answer
    matches the one torch itself makes. It is read when the process group is joined, since
    DistContext has no field for it.
    """
    return env.get("TORCHELASTIC_USE_AGENT_STORE", "").strip() == "True"


def _detect_cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _first_present(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((name for name in names if env.get(name, "").strip()), None)


def _env_int(env: Mapping[str, str], name: str, *, minimum: int = 0) -> int:
    raw = env[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise UserError(f"environment variable {name}={value} must be at least {minimum}")
    return value


def _port(env: Mapping[str, str], name: str) -> int:
    port = _env_int(env, name, minimum=1)
    if port > 65535:
        raise UserError(f"environment variable {name}={port} is not a TCP port (1..65535)")
    return port


def _check_rank(rank: int, rank_var: str, size: int, size_var: str) -> None:
    if rank >= size:
        raise UserError(f"{rank_var}={rank} is not below {size_var}={size}: ranks run from 0 to {size - 1}")
