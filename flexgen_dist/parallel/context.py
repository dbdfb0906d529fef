"""Who this process is in the pipeline: one `DistContext`, built once from the launcher's environment.

`DistContext.from_env` is the only place in flexgen_dist that reads the launcher's environment
variables; everything downstream gets the context passed in.

Launchers it understands; the innermost launcher of this process wins (launchers.py,
`_detect_launcher`):

1. torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, `LOCAL_WORLD_SIZE`).
   Nothing else sets `RANK`, so torchrun is innermost wherever it runs, inside sbatch or srun too.
2. SLURM `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, the first host of the node list),
   only inside an srun step (`SLURM_STEP_ID` set). `srun --mpi=pmi2/pmix` sets MPI's variables too,
   consistently; this path needs no mpi4py.
3. MPI: Open MPI (`OMPI_COMM_WORLD_*`) or MPICH / Hydra / Intel MPI (`PMI_RANK`, `PMI_SIZE`,
   `MPI_LOCALRANKID`). Rank 0's address and a free port are broadcast with mpi4py. MPI wins over
   SLURM's variables in an sbatch script's batch step (no `SLURM_STEP_ID`: every mpirun rank
   inherits the batch step's `SLURM_PROCID=0`), and inside an srun step whose rank or size differs
   from MPI's (mpirun's daemons started by srun on the other nodes).
4. None of these: one process ("single"), no process group; a batch step with `SLURM_NTASKS` > 1
   but no srun gets a warning saying to start the ranks with srun.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from flexgen_dist.errors import UserError

from .launchers import (
    DEFAULT_MASTER_ADDR,
    DEFAULT_MASTER_PORT,
    RANK_READERS,
    _detect_cuda_device_count,
    _detect_launcher,
    _port,
    _Ranks,
    torchrun_agent_serves_store,
)

logger = logging.getLogger(__name__)

LAUNCHERS = ("single", "torchrun", "slurm", "mpi")
# The rendezvous waits at least this long for every rank (see `DistContext.init_process_group`).
MIN_RENDEZVOUS_TIMEOUT_S = 60.0
BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the pipeline. Build it with `DistContext.from_env()`."""

    rank: int
    """Global rank, 0 .. world_size - 1. Rank r runs pipeline stage r."""
    world_size: int
    """Number of ranks (= pipeline stages). 1 means no process group at all."""
    local_rank: int
    """Rank among the processes on this node; picks the GPU, unless the launcher bound each task
    to GPUs of its own (srun --gpus-per-task, --gpu-bind): then it uses the first it sees."""
    master_addr: str
    """Address of rank 0's rendezvous store (TCP)."""
    master_port: int
    """Port of rank 0's rendezvous store."""
    backend: str
    """torch.distributed backend: "nccl" (each rank owns a GPU) or "gloo"."""
    device: str
    """Compute device of this rank: "cpu" or "cuda:N"."""
    launcher: str
    """What started this process: "single", "torchrun", "slurm" or "mpi"."""
    local_world_size: int = 1
    """Ranks on this node (they share its host memory, disk and CPU cores)."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise UserError(f"world_size={self.world_size} must be at least 1")
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank={self.rank} must be in 0..{self.world_size - 1} (world_size={self.world_size})")
        if self.local_rank < 0:
            raise UserError(f"local_rank={self.local_rank} must be >= 0")
        if not 1 <= self.master_port <= 65535:
            raise UserError(f"master_port={self.master_port} must be in 1..65535")
        if self.backend not in BACKENDS:
            raise UserError(f"backend={self.backend!r} must be one of {', '.join(BACKENDS)}")
        if self.launcher not in LAUNCHERS:
            raise UserError(f"launcher={self.launcher!r} must be one of {', '.join(LAUNCHERS)}")
        if self.device != "cpu" and not re.fullmatch(r"cuda:\d+", self.device):
            raise UserError(f"device={self.device!r} must be 'cpu' or 'cuda:N'")

    # ---- building -------------------------------------------------------------------------------

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        comm_backend: str | None = None,
        cuda_device_count: int | None = None,
    ) -> DistContext:
        """Build the context from the launcher's environment (`os.environ` when `env` is None).

        comm_backend: "nccl" or "gloo" to override the automatic choice.
        cuda_device_count: GPUs visible to this process; None asks torch.
        """
        env = os.environ if env is None else env
        launcher = _detect_launcher(env)
        if launcher in RANK_READERS:
            module_name, reader = RANK_READERS[launcher]
            ranks = getattr(importlib.import_module(f"{__package__}.{module_name}"), reader)(env)
        else:
            ranks = _Ranks(
                rank=0,
                world_size=1,
                local_rank=0,
                local_world_size=1,
                master_addr=env.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
                master_port=_port(env, "MASTER_PORT") if env.get("MASTER_PORT") else DEFAULT_MASTER_PORT,
            )
        if cuda_device_count is None:
            cuda_device_count = _detect_cuda_device_count()
        backend = choose_backend(ranks.local_world_size, cuda_device_count, comm_backend, gpus_bound=ranks.gpus_bound)
        device = choose_device(ranks.local_rank, cuda_device_count, gpus_bound=ranks.gpus_bound)
        return cls(
            rank=ranks.rank,
            world_size=ranks.world_size,
            local_rank=ranks.local_rank,
            master_addr=ranks.master_addr,
            master_port=ranks.master_port,
            backend=backend,
            device=device,
            launcher=launcher,
            local_world_size=ranks.local_world_size,
        )

    # ---- pipeline position ----------------------------------------------------------------------

    @property
    def is_first(self) -> bool:
        """This rank holds the embedding (stage 0)."""
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        """This rank holds the head and samples the next tokens."""
        return self.rank == self.world_size - 1

    @property
    def next_rank(self) -> int:
        """Where this rank's output goes; the last rank sends token ids back to rank 0 (a ring)."""
        return (self.rank + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        """Where this rank's input comes from."""
        return (self.rank - 1) % self.world_size

    # ---- process group --------------------------------------------------------------------------

    @property
    def init_method(self) -> str:
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr  # IPv6
        return f"tcp://{host}:{self.master_port}"

    def init_process_group(self, timeout_s: float, *, rendezvous_timeout_s: float | None = None) -> None:
        """Join the process group (no-op with one rank). Every rank must call it.

        timeout_s: how long any later wait on a peer may take (the process group's timeout).
        rendezvous_timeout_s: how long to wait for every rank to arrive; by default timeout_s, but
        at least MIN_RENDEZVOUS_TIMEOUT_S: ranks start apart by seconds to minutes (imports from a
        shared file system, a node that boots slowly), which is no sign of a hung peer.
        Raises `RendezvousError` (a `PeerError`, one line naming the ranks that did not join) when
        the ranks do not all meet in time, rank 0 cannot be reached, its port is taken, or what
        answers at its address is not its store (another service: the wait for an answer is
        bounded by timeout_s).
        """
        if self.world_size == 1:
            return
        if timeout_s <= 0:
            raise UserError(f"timeout_s={timeout_s} must be positive")
        if rendezvous_timeout_s is None:
            rendezvous_timeout_s = max(timeout_s, MIN_RENDEZVOUS_TIMEOUT_S)
        elif rendezvous_timeout_s <= 0:
            raise UserError(f"rendezvous_timeout_s={rendezvous_timeout_s} must be positive")
        import torch
        import torch.distributed as dist

        from .rendezvous import join_process_group

        if dist.is_initialized():
            return
        if self.device.startswith("cuda"):
            # NCCL binds a communicator to the current device; set it before the first collective.
            torch.cuda.set_device(torch.device(self.device))
        logger.info(
            "joining process group: backend=%s rank=%d/%d via %s (launcher %s, device %s)",
            self.backend, self.rank, self.world_size, self.init_method, self.launcher, self.device,
        )
        join_process_group(
            rank=self.rank,
            world_size=self.world_size,
            master_addr=self.master_addr,
            master_port=self.master_port,
            backend=self.backend,
            timeout_s=timeout_s,
            rendezvous_timeout_s=rendezvous_timeout_s,
            store_served_by_launcher=self.launcher == "torchrun" and torchrun_agent_serves_store(os.environ),
        )
        logger.debug("process group joined: rank %d of %d via %s", self.rank, self.world_size, self.init_method)

    def destroy(self) -> None:
        """Leave the process group. Safe to call twice and when it was never initialised."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def owns_gpu(local_world_size: int, cuda_device_count: int, *, gpus_bound: bool = False) -> bool:
    """Each rank on this node has a GPU of its own: the launcher bound GPUs to each task
    (`gpus_bound`, e.g. `srun --gpus-per-task=1`: every task sees one GPU, its own), or this
    process sees a GPU per local rank."""
    return cuda_device_count > 0 and (gpus_bound or local_world_size <= cuda_device_count)


def choose_device(local_rank: int, cuda_device_count: int, *, gpus_bound: bool = False) -> str:
    """The first GPU this process sees when they are all its own (`gpus_bound`); else the
    local rank's (shared in turn when there are fewer GPUs than local ranks); the CPU without."""
    if cuda_device_count < 1:
        return "cpu"
    return "cuda:0" if gpus_bound else f"cuda:{local_rank % cuda_device_count}"


def choose_backend(local_world_size: int, cuda_device_count: int, comm_backend: str | None = None, *,
                   gpus_bound: bool = False) -> str:
    """NCCL when every rank on this node owns a GPU (`owns_gpu`), else gloo; `comm_backend` overrides.

    Several ranks sharing one GPU is not supported by NCCL, so that case falls back to gloo too.
    """
    own = owns_gpu(local_world_size, cuda_device_count, gpus_bound=gpus_bound)
    if comm_backend is not None:
        if comm_backend not in BACKENDS:
            raise UserError(f"comm backend {comm_backend!r} is unknown: use one of {', '.join(BACKENDS)}")
        if comm_backend == "nccl" and cuda_device_count < 1:
            raise UserError("comm backend 'nccl' needs CUDA but no GPU is visible: use gloo or run on GPUs")
        if comm_backend == "nccl" and not own:
            logger.warning(
                "comm backend nccl with %d ranks on this node but %d GPUs: ranks share a GPU, which NCCL "
                "rejects; use gloo if initialisation fails", local_world_size, cuda_device_count,
            )
        return comm_backend
    return "nccl" if own else "gloo"


def setup_logging(ctx: DistContext, verbose: bool) -> None:
    """Log to stderr with the rank in every line; rank 0 at INFO, the others at WARNING.

    verbose: DEBUG on every rank. With one process the rank prefix is left out. Calling it again
    replaces the handler it installed before (and no other handler).
    """
    prefix = f"[rank {ctx.rank}/{ctx.world_size}] " if ctx.world_size > 1 else ""
    if verbose:
        level = logging.DEBUG
    else:
        level = logging.INFO if ctx.rank == 0 else logging.WARNING
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_flexgen_dist", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._flexgen_dist = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)


