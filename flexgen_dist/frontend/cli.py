"""Flags shared by the commands (run, eval, bench): model, policy, offload folder; and the
one-line error handling every command uses (exit code 2, no traceback)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from ..errors import UserError
from ..planning.policy import Policy


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
    parser.add_argument("--device", default=None, help="compute device (default: cuda when available, else cpu)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log placement and progress")


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
    )


def run_command(main: Callable[[], int]) -> int:
    """Run a command's body; a user's mistake becomes one line on stderr and exit code 2."""
    try:
        return main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
