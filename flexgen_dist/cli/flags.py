"""Flags shared by the commands (run, eval, bench): model, policy, offload folder. The one-line
error handling every command runs in is shell.py's."""

from __future__ import annotations

import argparse
import math
import logging

from ..errors import UserError
from ..parallel.context import DistContext
from ..parallel.context import setup_logging as dist_setup_logging
from ..parallel.group import Pipeline
from ..planning.policy import Policy
from ..planning.search import SearchOptions
from ..sizes import parse_size
from ..storage.tiers import DiskIO
from .shell import OneLineParser
from ..api.planner import Capacity, ModelSetup
from ..api.runtime import Runtime
from ..jobs.config import SCHEDULE_FLAGS, GenerationFlags, JobConfig
from ..jobs.requests import check_text


MAX_THREADS = 64  # --io-threads and --prefetch-depth (one loading thread per layer ahead)

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
    parser = OneLineParser(prog=prog, usage=f"{prog} [options]", description=description, epilog=epilog,
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
    model.add_argument("--model", default=default_model, metavar="DIR|FILE.gguf",
                       help="local Hugging Face model folder (config.json, safetensors weights, tokenizer files), "
                            "or a GGUF file (llama, qwen2, qwen3; Q4_0/Q4_1/Q8_0 weights stay compressed) "
                            "(default: the bundled model)")
    model.add_argument("--device", default=None,
                       help="compute device: cpu, cuda or cuda:N (default: this rank's GPU when there is one, else cpu)")
    model.add_argument("--compute-dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                       help="what layers compute in. auto: on a CPU, for a 16-bit checkpoint, float32 or the "
                            "checkpoint's dtype, whichever this machine's profile predicts faster (float32 for a "
                            "float32 checkpoint); on a GPU bfloat16 for a bfloat16 checkpoint where supported, "
                            "else float16")
    policy = groups["policy and placement"]
    policy.add_argument("--policy", choices=("auto", "manual"), default="auto",
                        help="auto: the planner chooses the block shape and where every tensor lives, from this "
                             "machine's memory and profiled speeds; manual: --percent and the block flags as given "
                             "(giving --percent means manual)")
    policy.add_argument("--print-policy", action="store_true",
                        help="print the chosen policy, the planned memory per tier against the capacity and the "
                             "predicted throughput, and exit without loading weights")
    policy.add_argument(
        "--percent",
        nargs=6,
        type=float,
        metavar=("W_GPU", "W_CPU", "CACHE_GPU", "CACHE_CPU", "ACT_GPU", "ACT_CPU"),
        default=None,
        help="percent of weights, KV cache and activations on the gpu and cpu tiers; the disk takes the rest "
             "(default: chosen by the planner; with --policy manual, 100 0 100 0 100 0)",
    )
    policy.add_argument("--gpu-batch-size", type=int, default=None, metavar="N",
                        help="sequences computed together in one call (default: chosen by the planner; 16 when "
                             "--num-gpu-batches or --policy manual is given)")
    policy.add_argument("--num-gpu-batches", type=int, default=None, metavar="K",
                        help="GPU batches per block: a block is N x K prompts, and each layer's weights are loaded "
                             "once per token for the whole block (default: chosen by the planner; 1 when "
                             "--gpu-batch-size or --policy manual is given)")
    policy.add_argument("--max-latency", type=float, default=None, metavar="S",
                        help="the planner's bound on the seconds one block takes from its prefill to its last token "
                             "(default: none, throughput first)")
    policy.add_argument("--allow-compression", action="store_true",
                        help="let the planner choose 4-bit weights and cache and a 16-bit cache (lossy)")
    policy.add_argument("--gpu-mem", default=None, metavar="SIZE",
                        help="this rank's gpu tier, e.g. 8G (default: the GPU's free memory; without a GPU, "
                             "host memory, shared with the cpu tier)")
    policy.add_argument("--cpu-mem", default=None, metavar="SIZE",
                        help="this rank's cpu tier, e.g. 32G (default: its share of the available host memory, "
                             "within a container's memory limit)")
    policy.add_argument("--disk-mem", default=None, metavar="SIZE",
                        help="this rank's disk tier, e.g. 500G (default: its share of the offload folder's free space)")
    policy.add_argument("--hardware", default=None, metavar="FILE.json",
                        help="plan for the machine this describes (python -m flexgen_dist.profile writes one; "
                             "or a preset: flexgen-t4) instead of this one (default: this machine)")
    policy.add_argument("--cpu-cache-compute", action="store_true",
                        help="run decode attention on the CPU over the host-memory KV cache, in place")
    policy.add_argument("--compress-weight", action="store_true",
                        help="store weights as groups of 4-bit values (see --compress-bits), dequantized once per "
                             "layer per block")
    policy.add_argument("--compress-cache", action="store_true", help="store the KV cache as groups of 4-bit values")
    policy.add_argument("--compress-cache-method", choices=("kivi", "minmax"), default="kivi",
                        help="how a compressed KV cache is grouped: keys per channel over --compress-group-size "
                             "slots, values per token, the newest slots in full precision (see "
                             "--compress-cache-window) (kivi), or every slot's keys and values along the head dimension, as "
                             "FlexGen (minmax)")
    policy.add_argument("--compress-cache-window", type=int, default=128, metavar="SLOTS",
                        help="kivi: the newest cache slots kept in full precision, in whole groups of "
                             "--compress-group-size (KIVI's residual; 0: only the group being filled)")
    policy.add_argument("--compress-bits", type=int, default=4, metavar="N", help="bits per compressed value: 4 or 8")
    policy.add_argument("--compress-group-size", type=int, default=64, metavar="N",
                        help="values sharing one scale and minimum")
    policy.add_argument("--compress-weight-method", choices=("fitted", "minmax"), default="fitted",
                        help="how each group of compressed weights picks its minimum and scale: the lowest error over "
                             "clipped ranges (fitted: about 0.8x min-max's squared error, 10-20x slower to write) or "
                             "min-max round-to-nearest (the FlexGen paper's)"),
    policy.add_argument("--cache-dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="storage of an uncompressed KV cache (default: the compute dtype, which keeps greedy "
                             "output equal to transformers)")
    policy.add_argument("--attn-sparsity", type=float, default=1.0, metavar="F",
                        help="in decoding, use only the values of the top F of each head's attention positions "
                             "(1 = dense, 0.1 = the paper's sparse setting)")
    policy.add_argument("--experts-ahead", action="store_true",
                        help="a mixture of experts' decode steps load every expert with its layer, ahead of the "
                             "compute, instead of each expert a row chose once the router chose it (default: the "
                             "planner decides; a given policy loads the chosen ones)")
    policy.add_argument("--no-refill", action="store_true",
                        help="run each block until its longest row ends, instead of giving a finished row the next "
                             "waiting prompt (same tokens; for comparison)")
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
    offload.add_argument("--prune-offload", action="store_true",
                         help="remove the weight folders in --offload-dir whose checkpoint no longer exists or has "
                              "changed (default: list them as a warning)")
    offload.add_argument("--verify-offload", action="store_true",
                         help="re-check the checksum of every reused offload-folder file before the run")
    dist = groups["distributed"]
    dist.add_argument("--stage-layers", default=None, metavar="L0,L1,...",
                      help="with several ranks: decoder layers per rank, e.g. 10,12,10 (default: balanced by cost)")
    dist.add_argument("--comm-backend", choices=("gloo", "nccl"), default=None,
                      help="process-group backend (default: nccl when each rank owns a GPU, else gloo)")
    dist.add_argument("--comm-timeout", type=float, default=300.0, metavar="S",
                      help="seconds to wait at least for a peer rank before stopping with an error that names it "
                           "(longer when the plan predicts tasks that long waits could cut short)")
    groups["diagnostics"].add_argument("--verbose", "-v", action="store_true",
                                       help="log placement and progress details (every rank, with its number)")


# A policy checks itself (planning/policy.py, compression.py) and its errors name its fields, the
# API's words; a command-line user gave flags, so the same errors name the flags instead.
_FLAG_OF_FIELD = (
    ("CompressionConfig.bits", "--compress-bits"),
    (" bits=", " --compress-bits "),
    ("CompressionConfig.group_size", "--compress-group-size"),
    ("CompressionConfig.cache_window", "--compress-cache-window"),
    ("attn_sparsity", "--attn-sparsity"),
    ("w_gpu_percent", "--percent's 1st value (weights on gpu)"),
    ("w_cpu_percent", "--percent's 2nd value (weights on cpu)"),
    ("cache_gpu_percent", "--percent's 3rd value (KV cache on gpu)"),
    ("cache_cpu_percent", "--percent's 4th value (KV cache on cpu)"),
    ("act_gpu_percent", "--percent's 5th value (activations on gpu)"),
    ("act_cpu_percent", "--percent's 6th value (activations on cpu)"),
)


def policy_from_args(args: argparse.Namespace) -> tuple[Policy | None, Policy, SearchOptions]:
    """(the policy, or None for the planner; what the planner keeps; what it may choose)."""
    try:
        return _policy_from_args(args)
    except UserError as exc:
        message = str(exc)
        for field, flag in _FLAG_OF_FIELD:
            message = message.replace(field, flag)
        if message == str(exc):
            raise
        raise UserError(message) from None


def _policy_from_args(args: argparse.Namespace) -> tuple[Policy | None, Policy, SearchOptions]:
    from ..planning.compression import CompressionConfig

    for flag, value in (("--gpu-batch-size", args.gpu_batch_size), ("--num-gpu-batches", args.num_gpu_batches)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be a whole number >= 1, got {value}")
    compression = CompressionConfig(bits=args.compress_bits, group_size=args.compress_group_size,
                                    weight_method=args.compress_weight_method, cache_method=args.compress_cache_method,
                                    cache_window=args.compress_cache_window)
    switches = dict(overlap=not args.no_overlap, cpu_cache_compute=args.cpu_cache_compute,
                    experts_on_demand=not args.experts_ahead,
                    compress_weight=args.compress_weight, compress_cache=args.compress_cache, compression=compression,
                    cache_dtype=args.cache_dtype, attn_sparsity=args.attn_sparsity)
    manual = args.policy == "manual" or args.percent is not None
    if manual:
        why = "--percent" if args.percent is not None else "--policy manual"
        for flag, given in (("--max-latency", args.max_latency is not None), ("--allow-compression", args.allow_compression)):
            if given:
                raise UserError(f"{flag} guides the planner, but {why} fixes the policy; give one or the other")
        w_gpu, w_cpu, c_gpu, c_cpu, a_gpu, a_cpu = args.percent if args.percent is not None else (100, 0, 100, 0, 100, 0)
        policy = Policy(gpu_batch_size=args.gpu_batch_size or 16, num_gpu_batches=args.num_gpu_batches or 1,
                        w_gpu_percent=w_gpu, w_cpu_percent=w_cpu, cache_gpu_percent=c_gpu, cache_cpu_percent=c_cpu,
                        act_gpu_percent=a_gpu, act_cpu_percent=a_cpu, **switches)
        return policy, policy, SearchOptions()
    if args.max_latency is not None and args.max_latency <= 0:
        raise UserError(f"--max-latency must be a positive number of seconds, got {args.max_latency:g}")
    grid = {}
    if args.gpu_batch_size is not None or args.num_gpu_batches is not None:  # the block as given, placed by the planner
        grid = {"gpu_batch_sizes": (args.gpu_batch_size or 16,), "num_gpu_batches": (args.num_gpu_batches or 1,)}
    given = args.compress_weight or args.compress_cache or args.cache_dtype is not None or args.attn_sparsity < 1
    options = SearchOptions(allow_compression=args.allow_compression and not given,
                            allow_cache_16bit=args.allow_compression and args.cache_dtype is None,
                            allow_cpu_attention=not args.cpu_cache_compute, max_latency=args.max_latency, **grid)
    return None, Policy(**switches), options


def dist_from_args(args: argparse.Namespace) -> DistContext:
    """The process's place in the pipeline (world size 1 without a launcher), with logging set up."""
    ctx = DistContext.from_env(comm_backend=args.comm_backend)
    dist_setup_logging(ctx, args.verbose)
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 quiet too, unless --verbose
    return ctx


def start_pipeline(args: argparse.Namespace, ctx: DistContext) -> Pipeline:
    """The run's process group (none with one process); the command that calls this closes it."""
    if not (math.isfinite(args.comm_timeout) and args.comm_timeout > 0):
        raise UserError(f"--comm-timeout must be a positive number of seconds, got {args.comm_timeout:g}")
    stage_layers = parse_stage_layers(args.stage_layers) if args.stage_layers else None
    return Pipeline.start(ctx, timeout_s=args.comm_timeout, stage_layers=stage_layers)


def setup_from_args(args: argparse.Namespace, ctx: DistContext) -> ModelSetup:
    """How the model is placed and run, from the shared flags (policy, offload folder, runtime,
    capacity); `for_workload` sizes it for a run's prompts."""
    if not 1 <= args.io_threads <= MAX_THREADS:
        raise UserError(f"--io-threads must be between 1 and {MAX_THREADS}, got {args.io_threads}")
    if not 1 <= args.prefetch_depth <= MAX_THREADS:
        raise UserError(f"--prefetch-depth must be between 1 and {MAX_THREADS} layers, got {args.prefetch_depth}")
    sizes = {name: parse_size(getattr(args, name), f"--{name.replace('_', '-')}") if getattr(args, name) else None
             for name in ("gpu_mem", "cpu_mem", "disk_mem")}
    capacity = Capacity(**sizes, hardware=args.hardware)
    policy, base, search = policy_from_args(args)
    runtime = Runtime(
        compute_dtype=None if args.compute_dtype in (None, "auto") else args.compute_dtype,
        device=args.device or (ctx.device if ctx.world_size > 1 else None),
        prefetch_depth=args.prefetch_depth,
        disk_io=DiskIO(direct=args.direct_io, drop_page_cache=args.drop_page_cache, threads=args.io_threads),
        verify_offload=args.verify_offload,
        prune_offload=args.prune_offload,
        refill=not args.no_refill,
    )
    return ModelSetup(runtime=runtime, policy=policy, base=base, search=search, capacity=capacity,
                      offload_dir=args.offload_dir)


def check_generation_flags(args: argparse.Namespace) -> None:
    """The generation flags the user gave, with flag names in the messages (before any file is read)."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UserError(f"--temperature must be a finite number > 0, got {args.temperature:g}; "
                        f"give --no-do-sample for greedy decoding")
    if args.top_k is not None and args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 turns it off), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (1 turns it off), got {args.top_p:g}")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), got {args.seed}")
    for text in args.stop or ():
        if not text:
            raise UserError("--stop '' would stop at once; give a non-empty string")
        check_text(text, "--stop")


def generation_from_args(args: argparse.Namespace) -> GenerationFlags:
    """The generation flags, checked (the model's generation_config.json fills what is not given)."""
    check_generation_flags(args)
    return GenerationFlags(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           stop=tuple(args.stop or ()), stop_token_ids=tuple(args.stop_token_ids or ()),
                           ignore_eos=args.ignore_eos)


def job_config(args: argparse.Namespace, ctx: DistContext) -> JobConfig:
    """The `run` command's configuration: every flag checked here, in one place."""
    return JobConfig(
        model=args.model, setup=setup_from_args(args, ctx), generation=generation_from_args(args),
        input=args.input, prompts=tuple(args.prompt or ()), output=args.output, overwrite=args.overwrite,
        truncate=args.truncate, shard=args.shard, num_prompts=args.num_prompts, prompt_len=args.prompt_len,
        block=(args.gpu_batch_size, args.num_gpu_batches), trace=args.trace, stats_json=args.stats_json,
        print_policy=args.print_policy, quiet=args.quiet, warmup=not args.no_warmup,
        schedule=tuple((name, _frozen(getattr(args, name, None))) for name in SCHEDULE_FLAGS))


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def parse_stage_layers(text: str) -> list[int]:
    """Parse `--stage-layers` text such as "10,12,10" into layer counts per stage."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise UserError(f"--stage-layers {text!r}: give layer counts per rank separated by commas, e.g. 10,12,10")
    counts = []
    for part in parts:
        try:
            count = int(part)
        except ValueError:
            raise UserError(f"--stage-layers {text!r}: {part!r} is not a whole number") from None
        if count < 1:
            raise UserError(f"--stage-layers {text!r}: {count} is not a positive layer count")
        counts.append(count)
    return counts
