"""Dequantization throughput against a plain fp16 -> fp32 copy of the same weight.

    PYTHONPATH=$PWD python tools/bench_quantize.py [--rows 2048] [--cols 2048] [--repeats 50]
    PYTHONPATH=$PWD python tools/bench_quantize.py --layer 2048 --block 128   # one decoder layer

With --layer H: one OPT decoder layer of hidden size H (q, k, v, o: H x H; fc1: 4H x H; fc2:
H x 4H): the time to dequantize all its weights (once per layer per block) against the time of
that layer's decode matmuls for a block of --block sequences (one token each), in fp32.

Dequantization runs once per layer per block in the decode path, so what matters is its cost
relative to what an uncompressed fp16 weight costs anyway: one fp16 -> fp32 conversion. Both are
timed in this run, on this machine, with the same thread count; the median of `--repeats` runs
is reported. GB/s counts the fp32 output written.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flexgen_dist.planning.compression import CompressionConfig
from flexgen_dist.storage.quantize import dequantize, quantize


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm up: first-touch page faults and allocator
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--layer", type=int, default=None, metavar="H", help="one OPT layer of hidden size H")
    parser.add_argument("--block", type=int, default=128, help="sequences of a block (with --layer)")
    args = parser.parse_args()
    if args.layer:
        layer_against_compute(args.layer, args.block, args.repeats)
        return

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(args.rows, args.cols, generator=generator).to(torch.float16)
    out = torch.empty(args.rows, args.cols, dtype=torch.float32)
    output_gb = out.numel() * out.element_size() / 1e9
    print(f"weight {args.rows}x{args.cols} fp16, {torch.get_num_threads()} threads, median of {args.repeats}")

    baselines = {
        "fp16 .float() (allocates)": lambda: weight.float(),
        "fp16 -> fp32 copy_ into buffer": lambda: out.copy_(weight),
    }
    baseline_times = {name: median_seconds(fn, args.repeats) for name, fn in baselines.items()}
    for name, seconds in baseline_times.items():
        print(f"  {name:34s} {seconds * 1e3:7.3f} ms  {output_gb / seconds:6.2f} GB/s")
    # Compare like with like: into a buffer against copy_, allocating against .float() (a fresh
    # 16 MiB tensor pays its page faults on every call).
    references = (baseline_times["fp16 -> fp32 copy_ into buffer"], baseline_times["fp16 .float() (allocates)"])

    for bits in (4, 8):
        quantized = quantize(weight, CompressionConfig(bits=bits, group_size=64))
        for label, fn, reference, reference_name in (
            (f"dequantize {bits}-bit into out", lambda: dequantize(quantized, out=out), references[0], "copy_"),
            (f"dequantize {bits}-bit (allocates)", lambda: dequantize(quantized), references[1], ".float()"),
        ):
            seconds = median_seconds(fn, args.repeats)
            print(f"  {label:34s} {seconds * 1e3:7.3f} ms  {output_gb / seconds:6.2f} GB/s  "
                  f"{seconds / reference:5.2f}x the time of {reference_name}")


def layer_against_compute(hidden: int, block: int, repeats: int) -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(hidden, hidden)] * 4 + [(4 * hidden, hidden), (hidden, 4 * hidden)]
    weights = [torch.randn(*shape, generator=generator).to(torch.float16) for shape in shapes]
    outs = [torch.empty(shape, dtype=torch.float32) for shape in shapes]
    x = torch.randn(block, hidden, generator=generator)
    x4 = torch.randn(block, 4 * hidden, generator=generator)
    inputs = [x] * 5 + [x4]

    def compute() -> None:  # the layer's six matmuls for one decode step of the block
        for inp, weight in zip(inputs, outs):
            torch.nn.functional.linear(inp, weight)

    compute_s = median_seconds(compute, repeats)
    convert_s = median_seconds(lambda: [o.copy_(w) for o, w in zip(outs, weights)], repeats)
    params = sum(w.numel() for w in weights)
    print(f"OPT layer, hidden {hidden} ({params / 1e6:.1f} M weights), block {block}, {torch.get_num_threads()} threads, "
          f"median of {repeats}")
    print(f"  decode compute of the block (fp32 matmuls)  {compute_s * 1e3:8.2f} ms")
    print(f"  fp16 -> fp32 conversion of the layer        {convert_s * 1e3:8.2f} ms  {convert_s / compute_s:5.2f}x the compute")
    for bits in (4, 8):
        quantized = [quantize(w, CompressionConfig(bits=bits, group_size=64)) for w in weights]
        seconds = median_seconds(lambda: [dequantize(q, out=o) for q, o in zip(quantized, outs)], repeats)
        print(f"  {bits}-bit dequantization of the layer         {seconds * 1e3:8.2f} ms  "
              f"{seconds / compute_s:5.2f}x the compute")


if __name__ == "__main__":
    main()
