"""Baselines for the benchmark: transformers `generate` with the whole model in memory, and
Accelerate's disk offload (`device_map` + `max_memory` + `offload_folder`), each run as a child
process that prints one JSON line.

    python -m flexgen_dist.bench.baselines --system accelerate --model DIR --batch 16 \\
        --prompt-len 64 --gen-len 16 --max-memory 1G --offload-folder /scratch/offload --dtype bfloat16

Methodology (the same for both systems, and as FlexGen's `benchmark/hf_ds/hf_opt.py` measures):
- Random prompts of exactly `--prompt-len` ids drawn from [4, vocab) with `--seed` (no padding,
  no special ids), greedy (`do_sample=False`), `min_new_tokens = max_new_tokens = --gen-len`, so
  every sequence generates exactly gen-len tokens whatever its EOS.
- Compute in `--dtype` (the checkpoint is loaded converted to it): the bench runs every dtype
  that this machine computes well (bound.py measures which) and keeps the best. Without
  `--dtype`: fp32 on the CPU, fp16 on a GPU.
- Untimed warm-up: `generate` of 1 token for batch 1. Under Accelerate disk offload this is a
  whole pass over the weights read from the disk, kept anyway (the first call also pays torch's
  lazy initialisation) and reported as `warmup_s`.
- One timed `generate(gen-len)` call = `total_s`. `prefill_s` is its first forward call (timed by
  hooks on the model, as FlexGen's baseline does), `decode_s = total_s - prefill_s` (so generate's
  own overhead counts as decode). `--prefill-timing separate` instead times a separate
  `generate(max_new_tokens=1)` on the same batch as the prefill (one more full weight pass under
  disk offload).
- Throughputs as FlexGen counts them: prefill = batch * prompt_len / prefill_s, decode =
  batch * (gen_len - 1) / decode_s (the first new token comes out of the prefill), total =
  batch * gen_len / total_s.

The JSON line: system, batch, prompt_len, gen_len, prefill_s, decode_s, total_s,
prefill_tokens_per_s, decode_tokens_per_s, total_tokens_per_s; layers_by_tier ({"cpu": 1,
"disk": 23}), disk_layers, num_layers, notes ("1 cpu + 23 disk of 24 layers, max_memory
cpu=800.00 MiB"); warmup_s, load_s, forward_calls, device, dtype, threads, seed, model; and
peak_rss_bytes (the child's own VmHWM: anonymous memory plus mapped file pages, which under
Accelerate include the memory-mapped safetensors it reads disk-tier weights from).

The parent side (`run_baseline`, `best_batch`) is in runs.py; random-weight checkpoints of known
shapes in checkpoints.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from flexgen_dist.cli.shell import OneLineParser
from flexgen_dist.bench.bound import DTYPES
from flexgen_dist.bench.memlimit import evict_from_page_cache, format_size, parse_size
from flexgen_dist.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["SYSTEMS", "layer_tiers", "main"]

SYSTEMS = ("transformers", "accelerate")
FIRST_PROMPT_ID = 4  # OPT's ids 0..3 are <s>, <pad>, </s>, <unk>: random prompts stay above them

# ---------------------------------------------------------------- the child: one measured run


def layer_tiers(model) -> dict[str, int]:
    """How many decoder layers live on each tier of Accelerate's device map ("cpu", "disk", a
    GPU index as text, or "mixed" for a layer split across tiers). A model loaded without a map
    (or whose map collapsed to one device) counts every layer on that device."""
    import torch

    layers_name, num_layers = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and len(module) > num_layers:
            layers_name, num_layers = name, len(module)
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        device = str(next(model.parameters()).device.type)
        return {device: num_layers}
    counts: dict[str, int] = {}
    for layer_idx in range(num_layers):
        layer = f"{layers_name}.{layer_idx}"
        # The map entry that holds this layer whole is its longest prefix ("" = the whole
        # model); without one, Accelerate split the layer and its parts have entries.
        holders = [key for key in device_map if key == "" or layer == key or layer.startswith(key + ".")]
        if holders:
            tier = str(device_map[max(holders, key=len)])
        else:
            parts = {str(t) for key, t in device_map.items() if key.startswith(layer + ".")}
            tier = parts.pop() if len(parts) == 1 else "mixed"
        counts[tier] = counts.get(tier, 0) + 1
    return counts


def _tiers_text(tiers: dict[str, int]) -> str:
    """'1 cpu + 23 disk of 24 layers' (tiers by name, disk last)."""
    order = sorted(tiers, key=lambda tier: (tier == "disk", tier == "mixed", tier))
    return " + ".join(f"{tiers[tier]} {tier}" for tier in order) + f" of {sum(tiers.values())} layers"


def _vm_hwm_self() -> int | None:
    """This process's peak RSS (VmHWM; unlike ru_maxrss, not inflated by the parent's at fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class _ForwardTimer:
    """Wall time of every forward call of a model (synchronising CUDA around each), like
    FlexGen's `generate-forward` timer in its transformers baseline."""

    def __init__(self, model, sync: Callable[[], None]):
        self.durations: list[float] = []
        self._sync = sync
        self._start = None
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, module, args):
        self._sync()
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self._sync()
        self.durations.append(time.perf_counter() - self._start)

    def remove(self):
        for handle in self._handles:
            handle.remove()


def _load_model(args, dtype, device):
    from transformers import AutoModelForCausalLM

    if args.system == "transformers":
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        return model.to(device).eval(), {}
    max_memory = {"cpu": parse_size(args.max_memory)}
    if device.type == "cuda":
        cpu_budget = parse_size(args.max_cpu_memory) if args.max_cpu_memory else 0
        max_memory = {device.index or 0: parse_size(args.max_memory), "cpu": cpu_budget}
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, device_map="auto", max_memory=max_memory, offload_folder=args.offload_folder
    )
    return model.eval(), {"max_memory": {str(k): v for k, v in max_memory.items()}}


def _run(args) -> dict:
    """Load, warm up, measure; the JSON-ready record of one run."""
    import torch
    from transformers import AutoConfig

    torch.manual_seed(args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config = AutoConfig.from_pretrained(args.model)

    load_start = time.perf_counter()
    model, notes = _load_model(args, dtype, device)
    load_s = time.perf_counter() - load_start
    tiers = layer_tiers(model)
    if args.system == "accelerate":
        # Start cold: what loading read stays in the page cache otherwise (under a cap the cgroup
        # would push it out anyway; without one it is the memory Accelerate did not get).
        evict_from_page_cache([p for p in (args.model, args.offload_folder) if p])

    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(FIRST_PROMPT_ID, config.vocab_size, (args.batch, args.prompt_len), generator=generator)
    input_ids = input_ids.to(device)  # (B, P): exactly prompt_len ids each, no padding
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)

    def generate(ids, new_tokens):
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # EOS suppressed: every sequence makes new_tokens
                pad_token_id=pad,
            )
        sync()
        return out

    warmup_start = time.perf_counter()
    generate(input_ids[:1], 1)
    warmup_s = time.perf_counter() - warmup_start

    separate_prefill_s = None
    if args.prefill_timing == "separate":
        sync()
        start = time.perf_counter()
        generate(input_ids, 1)
        separate_prefill_s = time.perf_counter() - start

    timer = _ForwardTimer(model, sync)
    sync()
    start = time.perf_counter()
    output = generate(input_ids, args.gen_len)
    total_s = time.perf_counter() - start
    timer.remove()
    new_tokens = output.shape[1] - args.prompt_len
    if new_tokens != args.gen_len:
        raise RuntimeError(f"generate made {new_tokens} new tokens, not {args.gen_len}")

    prefill_s = separate_prefill_s if separate_prefill_s is not None else timer.durations[0]
    decode_s = max(total_s - prefill_s, 0.0)
    batch, prompt_len, gen_len = args.batch, args.prompt_len, args.gen_len
    record = {
        "system": args.system,
        "batch": batch,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": total_s,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s if prefill_s > 0 else 0.0,
        "decode_tokens_per_s": batch * (gen_len - 1) / decode_s if decode_s > 0 else 0.0,
        "total_tokens_per_s": batch * gen_len / total_s if total_s > 0 else 0.0,
        "prefill_timing": args.prefill_timing,
        "forward_calls": len(timer.durations),
        "warmup_s": warmup_s,
        "load_s": load_s,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),  # what it was loaded in
        "threads": torch.get_num_threads(),
        "num_layers": sum(tiers.values()),
        "layers_by_tier": tiers,
        "disk_layers": tiers.get("disk", 0),
        "peak_rss_bytes": _vm_hwm_self(),
        "seed": args.seed,
        "model": str(args.model),
    }
    if device.type == "cuda":
        record["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    record.update(notes)
    record["notes"] = _tiers_text(tiers) + "".join(
        f", max_memory {key}={format_size(value)}" for key, value in notes.get("max_memory", {}).items())
    if args.system == "accelerate":
        record["offload_folder"] = str(args.offload_folder)
        record["method_note"] = (
            "warm-up (1 token, batch 1) is a full pass over the disk-tier weights; disk-tier "
            "weights are read per forward from the checkpoint's safetensors (or the offload "
            "folder) and converted to the compute dtype"
        )
    return record


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m flexgen_dist.bench.baselines",
        description="One baseline run (transformers in memory, or Accelerate disk offload); prints one JSON line.",
    )
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint folder")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--prompt-len", type=int, required=True)
    parser.add_argument("--gen-len", type=int, required=True)
    parser.add_argument("--max-memory", help="accelerate: max_memory of the compute device (cpu here), e.g. 1G")
    parser.add_argument("--max-cpu-memory", help="accelerate on a GPU: max_memory of the cpu (default 0: the rest to disk)")
    parser.add_argument("--offload-folder", help="accelerate: where disk-tier weights go (default: a temporary folder)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute dtype, the checkpoint converted to it when loaded (default: float32 on the CPU, "
                             "float16 on a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--prefill-timing", choices=("first-forward", "separate"), default="first-forward",
                        help="prefill = the first forward of the timed generate (FlexGen's way), or a separate generate of 1 token")
    return parser


def _check_args(args) -> None:
    if not (Path(args.model) / "config.json").is_file():
        raise UserError(f"--model {args.model}: no config.json there; give a Hugging Face checkpoint folder")
    for name in ("batch", "prompt_len", "gen_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.system == "accelerate" and not args.max_memory:
        raise UserError("--system accelerate needs --max-memory (the memory budget, e.g. 1G)")
    if args.system == "transformers" and (args.max_memory or args.offload_folder):
        raise UserError("--max-memory / --offload-folder are for --system accelerate only")
    for name in ("max_memory", "max_cpu_memory"):
        if getattr(args, name):
            parse_size(getattr(args, name))


def main(argv: list[str] | None = None) -> int:
    """The child's entry point: one run, one JSON line on stdout (logs go to stderr)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        with contextlib.ExitStack() as stack:
            if args.system == "accelerate" and not args.offload_folder:
                args.offload_folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="flexgen-accel-offload-"))
            # transformers and Accelerate print progress bars and notes on stdout: keep stdout for
            # the one JSON line.
            with contextlib.redirect_stdout(sys.stderr):
                record = _run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
