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
from .signals import Interrupted


GROUPS = ("model", "prompts and output", "generation", "policy and placement", "offloading I/O", "distributed",
          "diagnostics")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help: a value as `(default: X)`, a switch as `(default: off)`.
    Options whose default is None say in their own words what happens without them."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is not None:
            return f"{text} (default: %(default)s)"
        return text


def new_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose help shows defaults, with the option groups of GROUPS (in that order;
    a group a command does not use is not shown). Description and epilog keep their lines."""
    parser = argparse.ArgumentParser(prog=prog, usage=f"{prog} [options]", description=description, epilog=epilog,
                                     formatter_class=HelpFormatter)
    parser._flexgen_groups = {title: parser.add_argument_group(title) for title in GROUPS}
    return parser


def group(parser: argparse.ArgumentParser, title: str):
    """The option group `title` of a parser made by `new_parser`."""
    return parser._flexgen_groups[title]


def add_model_args(parser: argparse.ArgumentParser, default_model: str) -> None:
    """The flags every command shares: model, policy and placement, offloading I/O, distributed,
    and --verbose. Grouped when the parser comes from `new_parser`."""
    groups = getattr(parser, "_flexgen_groups", None) or {title: parser for title in GROUPS}
    model = groups["model"]
    model.add_argument("--model", default=default_model, metavar="DIR",
                       help="local Hugging Face model folder: config.json, safetensors weights, tokenizer files "
                            "(default: the bundled model)")
    model.add_argument("--device", default=None,
                       help="compute device: cpu, cuda or cuda:N (default: this rank's GPU when there is one, else cpu)")
    model.add_argument("--compute-dtype", choices=("float32", "float16", "bfloat16"), default=None,
                       help="what layers compute in (default: float32 on the CPU; on a GPU bfloat16 for a bfloat16 "
                            "checkpoint where supported, else float16)")
    policy = groups["policy and placement"]
    policy.add_argument(
        "--percent",
        nargs=6,
        type=float,
        metavar=("W_GPU", "W_CPU", "CACHE_GPU", "CACHE_CPU", "ACT_GPU", "ACT_CPU"),
        default=[100, 0, 100, 0, 100, 0],
        help="percent of weights, KV cache and activations on the gpu and cpu tiers; the disk takes the rest "
             "(default: 100 0 100 0 100 0, everything on the compute device)",
    )
    policy.add_argument("--gpu-batch-size", type=int, default=16, metavar="N", help="sequences computed together in one call")
    policy.add_argument("--num-gpu-batches", type=int, default=1, metavar="K",
                        help="GPU batches per block: a block is N x K prompts, and each layer's weights are loaded "
                             "once per token for the whole block")
    policy.add_argument("--gpu-mem", default=None, metavar="SIZE",
                        help="per-rank capacity of the gpu tier, e.g. 8G; with --cpu-mem the percentages are fitted "
                             "to these capacities instead of --percent (default: use --percent)")
    policy.add_argument("--cpu-mem", default=None, metavar="SIZE",
                        help="per-rank capacity of the cpu tier, e.g. 32G (with --gpu-mem; default: use --percent)")
    policy.add_argument("--cpu-cache-compute", action="store_true",
                        help="run decode attention on the CPU over the host-memory KV cache, in place")
    policy.add_argument("--no-overlap", action="store_true",
                        help="load serially instead of prefetching the next layer and batch (same tokens; for debugging)")
    offload = groups["offloading I/O"]
    offload.add_argument("--offload-dir", default=None, metavar="DIR",
                         help="folder for disk-tier weights (written once, reused while the checkpoint is unchanged) "
                              "and the disk-tier KV cache of a run (default: none; needed when anything is on disk)")
    offload.add_argument("--prefetch-depth", type=int, default=1, metavar="N",
                         help="layers of weights loaded ahead of the computing one (each costs a layer of memory)")
    offload.add_argument("--io-threads", type=int, default=2, metavar="N",
                         help="threads reading one layer's disk-tier weights in parallel chunks")
    offload.add_argument("--direct-io", action="store_true",
                         help="read disk-tier weights with O_DIRECT (bypasses the page cache)")
    offload.add_argument("--drop-page-cache", action="store_true",
                         help="evict disk-tier weight pages after each read, so reads measure the disk, not RAM")
    dist = groups["distributed"]
    dist.add_argument("--stage-layers", default=None, metavar="L0,L1,...",
                      help="with several ranks: decoder layers per rank, e.g. 10,12,10 (default: balanced by cost)")
    dist.add_argument("--comm-backend", choices=("gloo", "nccl"), default=None,
                      help="process-group backend (default: nccl when each rank owns a GPU, else gloo)")
    dist.add_argument("--comm-timeout", type=float, default=300.0, metavar="S",
                      help="seconds to wait for a peer rank before stopping with an error that names it")
    groups["diagnostics"].add_argument("--verbose", "-v", action="store_true",
                                       help="log placement and progress details (every rank, with its number)")


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
        compute_dtype=args.compute_dtype,
        device=args.device or (ctx.device if ctx.world_size > 1 else None),
        prefetch_depth=args.prefetch_depth,
        disk_io=DiskIO(direct=args.direct_io, drop_page_cache=args.drop_page_cache, threads=args.io_threads),
        workload=workload,
    )
    return {"policy": policy_from_args(args), "offload_dir": args.offload_dir, "runtime": runtime, "capacity": capacity}


def run_command(main: Callable[[], int], rank_of: Callable[[], int] = lambda: 0) -> int:
    """Run a command's body: a user's mistake becomes one line on stderr and exit code 2 (printed
    by rank 0 only: every rank sees the same input); a failure of the environment (a dead or hung
    peer, a full disk), one line and exit code 1; SIGINT / SIGTERM (see signals.py), one line
    from rank 0 and 128 + the signal number."""
    try:
        return main()
    except UserError as exc:
        if rank_of() == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except (PeerError, EnvironmentFailure) as exc:
        logging.getLogger("flexgen_dist").error("%s", exc)
        return 1
    except Interrupted as exc:
        if rank_of() == 0:
            print(exc.message, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if rank_of() == 0:
            print("interrupted by SIGINT", file=sys.stderr)
        return 130
