"""MPI's variables (Open MPI's `OMPI_COMM_WORLD_*`, or MPICH / Hydra / Intel MPI's `PMI_*`), and
what the environment lacks asked of MPI through mpi4py: rank 0's address, a free port, the local
rank (launchers.py `RANK_READERS` imports this module when mpirun started the process).
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Mapping

from flexgen_dist.errors import UserError

from .hostlist import _reachable_address, free_port
from .launchers import (DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, _check_rank, _env_int, _first_present, _mpi_family,
                        _port, _Ranks)

MPI_INSTALL_HINT = "install the mpi extra: pip install 'flexgen_dist[mpi]'"


def _mpi_ranks(env: Mapping[str, str]) -> _Ranks:
    family = _mpi_family(env)
    assert family is not None
    rank_var, size_var = family.rank, family.size
    if size_var not in env:
        raise UserError(f"{rank_var} is set but {size_var} is not: start the ranks with mpirun")
    world_size = _env_int(env, size_var, minimum=1)
    rank = _env_int(env, rank_var)
    _check_rank(rank, rank_var, world_size, size_var)

    local_rank_var = _first_present(env, family.local_rank)
    local_size_var = _first_present(env, family.local_size)
    given_addr = env.get("MASTER_ADDR") or None
    given_port = _port(env, "MASTER_PORT") if env.get("MASTER_PORT") else None
    needs_mpi = world_size > 1 and (given_addr is None or given_port is None or local_rank_var is None)
    if needs_mpi:
        found = _mpi_exchange(rank, world_size, size_var, given_addr, given_port)
    else:  # one rank, or everything given: no mpi4py needed
        found = _Ranks(rank, world_size, 0, world_size, given_addr or DEFAULT_MASTER_ADDR,
                       given_port or DEFAULT_MASTER_PORT)

    local_rank = _env_int(env, local_rank_var) if local_rank_var is not None else found.local_rank
    if local_size_var is not None:
        local_world_size = _env_int(env, local_size_var, minimum=1)
    else:
        local_world_size = found.local_world_size
    _check_rank(local_rank, local_rank_var or "local rank", local_world_size, local_size_var or "local size")
    return dataclasses.replace(found, local_rank=local_rank, local_world_size=local_world_size)


def _mpi_exchange(rank: int, world_size: int, size_var: str, given_addr: str | None, given_port: int | None) -> _Ranks:
    """Ask MPI for what the environment lacks: rank 0's address, a free port, the local rank."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise UserError(f"launched by mpirun but mpi4py is missing ({error}): {MPI_INSTALL_HINT}") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != world_size or comm.Get_rank() != rank:
        raise UserError(
            f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()} but {size_var}={world_size}: mpi4py is built "
            "against another MPI than the mpirun that started this job; use that MPI's mpirun or rebuild mpi4py"
        )
    hostnames = comm.allgather(socket.gethostname())
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_world_size = node.Get_rank(), node.Get_size()
    node.Free()
    chosen = None
    if rank == 0:
        if given_addr is not None:
            addr = given_addr
        elif all(host == hostnames[0] for host in hostnames):
            addr = DEFAULT_MASTER_ADDR  # one node: loopback always works
        else:
            addr = _reachable_address()
        chosen = (addr, given_port if given_port is not None else free_port())
    addr, port = comm.bcast(chosen, root=0)
    return _Ranks(rank, world_size, local_rank, local_world_size, addr, port)
