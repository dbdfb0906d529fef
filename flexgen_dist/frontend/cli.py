"""Flags shared by the commands (run, eval, bench): model, policy, offload folder; and the
one-line error handling every command uses (exit code 2, no traceback)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from ..errors import EnvironmentFailure, UserError
from ..parallel.comm import PeerError
from ..parallel.context import DistContext
from ..parallel.context import setup_logging as dist_setup_logging
from ..parallel.group import Pipeline
from ..parallel.partition import parse_stage_layers
from ..planning.capacity import Capacity
from ..planning.placement import Workload
from ..planning.policy import Policy
from ..planning.sizes import parse_size
from ..storage.tiers import DiskIO
from .runtime import Runtime


def add_model_args(parser: argparse.ArgumentParser, default_model: str) -> None:
    parser.add_argument("--model", default=default_model, help="local Hugging Face model folder (default: the bundled model)")
    parser.add_argument(
        "--percent",
        nargs=6,
        type=float,
        metavar=("W_GPU", "W_CPU", "CACHE_GPU", "CACHE_CPU", "ACT_GPU", "ACT_CPU"),
        default=[100, 0, 100, 0, 100, 0],
        help="percent of weights, KV cache and activations on gpu and cpu; the disk takes the rest",
    )
    parser.add_argument("--gpu-batch-size", type=int, default=4, help="sequences per GPU batch")
    parser.add_argument("--num-gpu-batches", type=int, default=1, help="GPU batches per block")
    parser.add_argument("--offload-dir", default=None, help="folder for disk-tier weights (reused) and KV cache")
    parser.add_argument("--no-overlap", action="store_true", help="run loads serially (for debugging)")
    parser.add_argument("--cpu-cache-compute", action="store_true",
                        help="decode attention on the CPU over the host-memory KV cache, in place")
    parser.add_argument("--device", default=None, help="compute device (default: cuda when available, else cpu)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log placement and progress (every rank)")
    parser.add_argument("--stage-layers", default=None,
                        help="with several ranks: decoder layers per rank, e.g. 10,12,10 (default: balanced by cost)")
    parser.add_argument("--comm-backend", choices=("gloo", "nccl"), default=None,
                        help="override the backend (default: nccl when each rank owns a GPU, else gloo)")
    parser.add_argument("--gpu-mem", default=None,
                        help="per-rank capacity of the gpu tier (e.g. 8G); with --cpu-mem, overrides --percent by a greedy fit")
    parser.add_argument("--cpu-mem", default=None, help="per-rank capacity of the cpu tier (e.g. 32G)")
    parser.add_argument("--drop-page-cache", action="store_true",
                        help="evict disk-tier weight pages after each read, so reads measure the disk, not RAM")
    parser.add_argument("--direct-io", action="store_true", help="read disk-tier weights with O_DIRECT (bypasses the page cache)")
    parser.add_argument("--io-threads", type=int, default=2, help="threads reading one layer's disk weights (default 2)")
    parser.add_argument("--prefetch-depth", type=int, default=1, help="layers of weights loaded ahead (default 1)")
    parser.add_argument("--comm-timeout", type=float, default=300.0,
                        help="seconds to wait for a peer rank before stopping with an error (default 300)")


def policy_from_args(args: argparse.Namespace) -> Policy:
    w_gpu, w_cpu, c_gpu, c_cpu, a_gpu, a_cpu = args.percent
    return Policy(
        gpu_batch_size=args.gpu_batch_size,
        num_gpu_batches=args.num_gpu_batches,
        w_gpu_percent=w_gpu,
        w_cpu_percent=w_cpu,
        cache_gpu_percent=c_gpu,
        cache_cpu_percent=c_cpu,
        act_gpu_percent=a_gpu,
        act_cpu_percent=a_cpu,
        overlap=not args.no_overlap,
        cpu_cache_compute=args.cpu_cache_compute,
    )


def dist_from_args(args: argparse.Namespace) -> DistContext:
    """The process's place in the pipeline (world size 1 without a launcher), with logging set up."""
    ctx = DistContext.from_env(comm_backend=args.comm_backend)
    dist_setup_logging(ctx, args.verbose)
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 quiet too, unless --verbose
    return ctx


def start_pipeline(args: argparse.Namespace, ctx: DistContext) -> Pipeline:
    """The run's process group (none with one process); the command that calls this closes it."""
    stage_layers = parse_stage_layers(args.stage_layers) if args.stage_layers else None
    return Pipeline.start(ctx, timeout_s=args.comm_timeout, stage_layers=stage_layers)


def llm_kwargs_from_args(args: argparse.Namespace, ctx: DistContext, workload: Workload | None = None) -> dict:
    """Keyword arguments of `LLM` from the shared flags (policy, offload folder, runtime, capacity)."""
    if (args.gpu_mem is None) != (args.cpu_mem is None):
        raise UserError("give both --gpu-mem and --cpu-mem (per rank), or neither")
    if args.io_threads < 1:
        raise UserError(f"--io-threads must be >= 1, got {args.io_threads}")
    capacity = None
    if args.gpu_mem is not None:
        capacity = Capacity(parse_size(args.gpu_mem, "--gpu-mem"), parse_size(args.cpu_mem, "--cpu-mem"))
    runtime = Runtime(
        device=args.device or (ctx.device if ctx.world_size > 1 else None),
        prefetch_depth=args.prefetch_depth,
        disk_io=DiskIO(direct=args.direct_io, drop_page_cache=args.drop_page_cache, threads=args.io_threads),
        workload=workload,
    )
    return {"policy": policy_from_args(args), "offload_dir": args.offload_dir, "runtime": runtime, "capacity": capacity}


def run_command(main: Callable[[], int], rank_of: Callable[[], int] = lambda: 0) -> int:
    """Run a command's body: a user's mistake becomes one line on stderr and exit code 2 (printed
    by rank 0 only: every rank sees the same input); a failure of the environment (a dead or hung
    peer, a full disk), one line and exit code 1."""
    try:
        return main()
    except UserError as exc:
        if rank_of() == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except (PeerError, EnvironmentFailure) as exc:
        logging.getLogger("flexgen_dist").error("%s", exc)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
