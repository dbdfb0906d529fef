#!/usr/bin/env bash
# Run flexgen_dist as a pipeline of NPROC ranks on this one machine, started by torchrun.
#
# Expects: torch installed (it provides `torchrun`) and flexgen_dist importable by `python`.
#   NPROC            ranks to start (default: the number of GPUs nvidia-smi lists, else 2).
#                    With GPUs, give at most one rank per GPU to get NCCL; more ranks than
#                    GPUs (or no GPU) use gloo.
#   OMP_NUM_THREADS  CPU threads per rank (default: CPU cores / NPROC, at least 1; torchrun
#                    alone would force 1).
#   TORCHRUN         torchrun command (default: torchrun).
# torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
# --standalone picks a free rendezvous port, so several jobs can share a machine.
# All arguments go to `python -m flexgen_dist.run` unchanged. Inside an sbatch job or an srun
# step torchrun's variables win over the SLURM_* ones it inherits.
#
# Example:
#   NPROC=4 launch/torchrun_single_node.sh --model ~/models/Llama-3.1-8B --input prompts.jsonl --output results.jsonl
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
    NPROC=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if (( NPROC < 1 )); then
        NPROC=2
    fi
fi

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(nproc 2>/dev/null || echo 1)
    OMP_NUM_THREADS=$(( cores / NPROC > 0 ? cores / NPROC : 1 ))
fi
export OMP_NUM_THREADS

exec "${TORCHRUN:-torchrun}" --standalone --nnodes=1 --nproc_per_node="${NPROC}" \
    -m flexgen_dist.run "$@"
