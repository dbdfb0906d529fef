#!/usr/bin/env bash
# Run flexgen_dist as a pipeline of NP ranks with MPICH's Hydra launcher (mpiexec), also fine
# for Intel MPI and MVAPICH, which use Hydra too.
#
# Expects: MPICH (or a Hydra-based MPI) with mpi4py built against it (`pip install mpi4py` when
# MPICH is the system MPI) and flexgen_dist importable by `python` on every host. Each rank reads
# PMI_RANK / PMI_SIZE / MPI_LOCALRANKID; rank 0 broadcasts its address and a free port with
# mpi4py unless MASTER_ADDR and MASTER_PORT are set.
#   NP               ranks to start (default 2).
#   HOSTFILE         Hydra host file (-f) for several hosts (default: this host only).
#   OMP_NUM_THREADS  CPU threads per rank (default: CPU cores / NP, at least 1).
#   MPIEXEC          launcher command (default: mpiexec). MPIEXEC_ARGS: extra flags.
#   PYTHON           python on the hosts (default: python).
# Environment variables reach every rank with -genv NAME VALUE: OMP_NUM_THREADS, PYTHONPATH,
# MASTER_ADDR, MASTER_PORT, CUDA_VISIBLE_DEVICES, HF_HOME, HF_HUB_OFFLINE, NCCL_SOCKET_IFNAME,
# GLOO_SOCKET_IFNAME, NCCL_DEBUG (those that are set).
# All arguments go to `python -m flexgen_dist.run` unchanged.
#
# Example:
#   NP=4 HOSTFILE=hosts.txt launch/mpirun_mpich.sh --model ~/models/Llama-3.1-8B --input prompts.jsonl --output results.jsonl
set -euo pipefail

NP="${NP:-2}"
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(nproc 2>/dev/null || echo 1)
    OMP_NUM_THREADS=$(( cores / NP > 0 ? cores / NP : 1 ))
fi
export OMP_NUM_THREADS

args=(-n "${NP}")
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(-f "${HOSTFILE}")
fi
for name in OMP_NUM_THREADS PYTHONPATH MASTER_ADDR MASTER_PORT CUDA_VISIBLE_DEVICES HF_HOME \
            HF_HUB_OFFLINE NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_DEBUG; do
    if [[ -n "${!name:-}" ]]; then
        args+=(-genv "${name}" "${!name}")
    fi
done
# Word splitting of MPIEXEC_ARGS is intended: it holds several flags.
# shellcheck disable=SC2206
extra=(${MPIEXEC_ARGS:-})

exec "${MPIEXEC:-mpiexec}" "${args[@]}" ${extra[@]+"${extra[@]}"} "${PYTHON:-python}" -m flexgen_dist.run "$@"
