"""Memory capacities of this process: GPU, host RAM (under the cgroup limit), offload disk.

No torch at import time (torch.cuda is imported lazily, only where NVML cannot answer).

Host RAM: what this process may still allocate, not what the machine has. It is the smaller of
- psutil's `available` (MemAvailable: free plus reclaimable page cache, after every other
  process on the machine), and
- the headroom of every memory cgroup this process is in (a container's or a SLURM job's limit),
  v1 and v2: limit minus the group's working set (cgroups.py).
Total RAM would ignore other processes and the container's limit; the cgroup limit alone would
ignore that psutil inside a container reports the host's memory. Swap is not counted.
What this process already holds (torch, Python) is in use and so is not available: detect before
loading the model, and on a node with several ranks detect on all of them before any allocates.

GPU: free memory (other processes on the GPU count), from NVML, else torch.cuda.mem_get_info.
What the process will take outside the plan (its CUDA context, unless one exists already, the
kernels loaded on first use, cuBLAS workspaces, NCCL communicators) is `gpu_reserve` (below),
which the planner subtracts from a detected capacity (api/planner.py), after
dividing a GPU that several local ranks share (`ranks_per_gpu`). The CUDA index is mapped to
NVML's through CUDA_VISIBLE_DEVICES (indices or UUIDs); with it unset, NVML's order is taken as
CUDA's, which holds unless CUDA_DEVICE_ORDER=FASTEST_FIRST reorders a node of mixed GPUs (set
CUDA_DEVICE_ORDER=PCI_BUS_ID there).

Disk: free space (for this user) of the file system of the offload folder's nearest existing
parent. Files an earlier run left in the folder are not counted as free.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import psutil

from ..errors import UserError
from .cgroups import CgroupMemory, cgroup_memory
from .hardware import Capacities
from ..sizes import format_size

logger = logging.getLogger(__name__)


# --- host RAM -----------------------------------------------------------------------------------


def page_cache_reserve(limit: int) -> int:
    """What a cgroup-limited process leaves unplanned: the page cache its disk reads and writes go
    through is charged to the same group, and a group filled to its limit with anonymous memory
    makes the kernel reclaim that cache on every read (measured: a plan of 3.95 of 4 GiB decoded
    2.9x slower than predicted, one of 2.4 GiB within 5 %). An eighth of the limit, at least 256 MiB."""
    return max(256 << 20, limit // 8)


def host_memory(root: Path = Path("/")) -> tuple[int, CgroupMemory | None]:
    """(bytes of host RAM this process may plan to use, the binding cgroup limit or None). Under a
    cgroup limit its headroom less `page_cache_reserve`."""
    available = psutil.virtual_memory().available
    group = cgroup_memory(root)
    if group is None:
        return available, None
    return max(0, min(available, group.headroom - page_cache_reserve(group.limit))), group


# --- GPU ----------------------------------------------------------------------------------------


def _nvml_free(cuda_index: int, visible: str | None) -> tuple[int, str] | None:
    """(free bytes, GPU name) of CUDA device `cuda_index` from NVML; None without a driver/GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None  # no driver: no GPU
    try:
        entries = [e.strip() for e in visible.split(",")] if visible is not None else None
        if entries is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(cuda_index)
        elif cuda_index >= len(entries) or not entries[cuda_index] or entries[cuda_index].startswith("-"):
            return None
        elif entries[cuda_index].isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(entries[cuda_index]))
        else:  # GPU-<uuid> or MIG-<uuid>
            handle = pynvml.nvmlDeviceGetHandleByUUID(entries[cuda_index])
        name = pynvml.nvmlDeviceGetName(handle)
        free = int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
        return free, name.decode() if isinstance(name, bytes) else str(name)
    except pynvml.NVMLError:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _torch_free(cuda_index: int) -> tuple[int, str] | None:
    import torch  # lazily: only where NVML could not answer

    if not torch.cuda.is_available() or cuda_index >= torch.cuda.device_count():
        return None
    free, _total = torch.cuda.mem_get_info(cuda_index)
    return int(free), torch.cuda.get_device_name(cuda_index)


def gpu_memory(cuda_index: int, *, environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """(free bytes, name) of CUDA device `cuda_index`, NVML first, else torch.cuda; None: no GPU."""
    environ = os.environ if environ is None else environ
    return _nvml_free(cuda_index, environ.get("CUDA_VISIBLE_DEVICES")) or _torch_free(cuda_index)


def cuda_context_created() -> bool:
    """This process has a CUDA context already (so free GPU memory read now excludes it)."""
    import sys

    torch = sys.modules.get("torch")  # never imported here just to ask
    return torch is not None and torch.cuda.is_initialized()


def cuda_device_count() -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applied), as the launcher maps ranks."""
    import torch  # lazily: only with a GPU

    return torch.cuda.device_count()


# --- disk ---------------------------------------------------------------------------------------


def disk_free(folder: str | Path) -> int:
    """Free bytes (for this user) where `folder` is or would be created."""
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


# --- all together -------------------------------------------------------------------------------


def detect_capacities(
    device: str,
    offload_dir: str | Path | None,
    *,
    root: Path = Path("/"),
    environ: Mapping[str, str] | None = None,
) -> Capacities:
    """Capacities of this process on `device` ("cpu", "cuda" or "cuda:N"), machine-wide: apply
    `hardware.rank_share` for ranks sharing the node. No offload folder: disk_mem = 0."""
    host, group = host_memory(root)
    disk = disk_free(offload_dir) if offload_dir is not None else 0
    limit = f" (cgroup v{group.version} limit {format_size(group.limit)} at {group.group})" if group else ""
    if device == "cpu":
        logger.info("host RAM available %s%s; no GPU: the gpu tier is host RAM; disk free %s",
                    format_size(host), limit, format_size(disk))
        return Capacities(has_gpu=False, gpu_mem=host, cpu_mem=host, host_mem=host, disk_mem=disk)
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise UserError(f"device {device!r} is not cpu, cuda or cuda:N")
    cuda_index = int(index or 0)
    found = gpu_memory(cuda_index, environ=environ)
    if found is None:
        raise UserError(f"device {device} has no GPU here (NVML found none and torch.cuda is not available); "
                        "use the cpu device, or plan for another machine with --hardware FILE.json")
    free, name = found
    logger.info("GPU %d (%s) free %s; host RAM available %s%s; disk free %s",
                cuda_index, name, format_size(free), format_size(host), limit, format_size(disk))
    return Capacities(has_gpu=True, gpu_mem=free, cpu_mem=host, host_mem=host, disk_mem=disk)


# --- GPU memory a rank uses outside torch's allocator or outside the plan -------------------------

# Not measured on this machine's GPU (none was at hand); the numbers are documented figures,
# rounded up:
# - the CUDA context: ~300-500 MiB of device memory at creation with CUDA 12's lazy module
#   loading (more without it), counted by NVML / mem_get_info but by no torch allocator. A
#   context this process already created is in the free memory detected, so is not reserved again.
CUDA_CONTEXT_BYTES = 512 << 20
# - kernels loaded on first use (lazy loading): cuBLAS / cuBLASLt, attention and elementwise kernels.
CUDA_MODULES_BYTES = 256 << 20
# - cuBLAS and cuBLASLt workspaces, one each per (thread, stream) that runs matmuls: 32 MiB each
#   on Hopper and later (torch's default, cuBLAS's recommendation), 4 MiB and 1 MiB before. Only
#   the compute stream runs matmuls (loader streams copy and dequantize).
CUBLAS_WORKSPACE_BYTES = 2 * (32 << 20)
MATMUL_STREAMS = 1
# - an NCCL communicator: device buffers per channel and peer (NCCL_BUFFSIZE, 4 MiB, per channel,
#   up to 32 channels between two GPUs) and its own structures; reported from ~100 MiB for
#   send/receive to over 1 GiB for collectives over many channels (NVIDIA/nccl #864, #986, #1685).
#   A rank of the pipeline holds the default group's (the ranks' exchange of plans), one per
#   peer it sends to or receives from, and the token ring's.
NCCL_COMMUNICATOR_BYTES = 256 << 20


def nccl_communicators(world_size: int) -> int:
    """NCCL communicators a rank of a pipeline of `world_size` ranks may hold (see above)."""
    if world_size < 2:
        return 0
    return 1 + min(2, world_size - 1) + 1  # the default group, its pairs with each neighbour, the token ring


def gpu_reserve(*, context_created: bool, backend: str | None, world_size: int = 1) -> int:
    """Bytes of a rank's GPU to leave out of its plan: the CUDA context (unless created before
    the GPU's free memory was read), kernels loaded later, cuBLAS workspaces, and with NCCL its
    communicators."""
    reserve = CUDA_MODULES_BYTES + MATMUL_STREAMS * CUBLAS_WORKSPACE_BYTES
    if not context_created:
        reserve += CUDA_CONTEXT_BYTES
    if backend == "nccl":
        reserve += nccl_communicators(world_size) * NCCL_COMMUNICATOR_BYTES
    return reserve


def ranks_per_gpu(local_rank: int, local_world_size: int, gpu_count: int) -> int:
    """Local ranks on the GPU of `local_rank`, which takes GPU local_rank % gpu_count (as
    parallel/context.py assigns them): 2 ranks on 1 GPU share it, 4 on 2 share two each."""
    gpu_count = max(1, gpu_count)
    return sum(1 for r in range(local_world_size) if r % gpu_count == local_rank % gpu_count)
