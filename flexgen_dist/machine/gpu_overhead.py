"""GPU memory a rank uses outside torch's allocator or outside the plan (pure Python).

`detect.gpu_memory` reads what is free on a GPU; the planner (api/planner.py) takes from it
the rank's share when local ranks share a GPU (`ranks_per_gpu`) and then this reserve
(`gpu_reserve`): the CUDA context, kernels loaded on first use, cuBLAS workspaces, NCCL
communicators.
"""

from __future__ import annotations


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
