"""FlexGen's paper setting, planned and predicted by our planner (no torch, nothing downloaded).

The machine is the paper's GCP T4 (16 GB GPU, 208 GB RAM, 1.5 TB SSD) with the constants its cost
model was fitted to (machine/presets.py FLEXGEN_T4); the workload is prompt 512, 32 new tokens.
For OPT-30B and OPT-175B (their published configs) it prints:
- the policy our search chooses (block shape, --percent, switches) and its predicted throughput;
- the policy FlexGen's paper ran (benchmark/flexgen/bench_suite.py in FMInference/FlexLLMGen),
  predicted by OUR cost model, with whether it fits OUR exact placement;
- the throughput the paper measured (its Table 2: 7.32 / 0.69 tokens/s, 8.38 / 1.12 with
  compression).
So the comparison is model against model (same cost model, two policies) and model against the
paper's measurement.

    python tools/paper_setting.py [--num-prompts N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexgen_dist.planning.compression import CompressionConfig  # noqa: E402
from flexgen_dist.planning.cost_model import estimate  # noqa: E402
from flexgen_dist.planning.fit import policy_flags, shortfalls, limit_label  # noqa: E402
from flexgen_dist.spec.layout import model_units  # noqa: E402
from flexgen_dist.planning.placement import Buffers, Dtypes, Tier, Workload, plan_placement  # noqa: E402
from flexgen_dist.planning.policy import Policy  # noqa: E402
from flexgen_dist.machine.presets import FLEXGEN_T4  # noqa: E402
from flexgen_dist.planning.search import SearchOptions, search  # noqa: E402
from flexgen_dist.sizes import format_size  # noqa: E402
from flexgen_dist.spec.model import ModelSpec  # noqa: E402

# facebook/opt-30b and facebook/opt-175b config.json shapes
OPT = {
    "OPT-30B": dict(hidden_size=7168, num_attention_heads=56, ffn_dim=28672, num_hidden_layers=48),
    "OPT-175B": dict(hidden_size=12288, num_attention_heads=96, ffn_dim=49152, num_hidden_layers=96),
}


def paper_policy(percent, gbs, num_batches, **switches) -> Policy:
    w_gpu, w_cpu, c_gpu, c_cpu, a_gpu, a_cpu = percent
    return Policy(gpu_batch_size=gbs, num_gpu_batches=num_batches, w_gpu_percent=w_gpu, w_cpu_percent=w_cpu,
                  cache_gpu_percent=c_gpu, cache_cpu_percent=c_cpu, act_gpu_percent=a_gpu, act_cpu_percent=a_cpu,
                  compression=CompressionConfig(bits=4, group_size=64), **switches)


# bench_suite.py, prompt 512 (its --cpu is cpu_cache_compute) and the paper's Table 2 throughput
PAPER = {
    ("OPT-30B", False): (paper_policy((20, 80, 0, 100, 0, 100), 48, 3, cpu_cache_compute=True), 7.32),
    ("OPT-30B", True): (paper_policy((0, 100, 0, 100, 0, 100), 64, 8, compress_cache=True), 8.38),
    ("OPT-175B", False): (paper_policy((0, 50, 0, 0, 0, 100), 32, 8, cpu_cache_compute=True, pin_weight=False), 0.69),
    ("OPT-175B", True): (paper_policy((0, 100, 0, 100, 0, 100), 48, 3, compress_weight=True, compress_cache=True), 1.12),
}


def spec_of(name: str) -> ModelSpec:
    return ModelSpec.from_config(dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048,
                                      torch_dtype="float16", **OPT[name]))


def fit_note(placement) -> str:
    short = shortfalls(placement.bytes_per_tier(), FLEXGEN_T4)
    if not short:
        return "fits"
    idx, limit, need = short[0]
    return f"does NOT fit our placement: {limit_label(idx, limit)} {format_size(need)} > {format_size(limit.capacity)}"


def describe(est) -> str:
    decode = est.decode
    return (f"{est.throughput:6.3f} tok/s  (prefill {est.prefill_s:7.1f} s, decode {est.decode_s:7.1f} s; "
            f"decode step {decode.seconds:.3g} s, {decode.bound}-bound: compute {decode.compute_s:.3g} s, "
            f"loads {decode.load_s:.3g} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="prompts in the workload (default: whole blocks, the paper's way of counting)")
    args = parser.parse_args()
    dtypes, workload, buffers = Dtypes("float16", "float16"), Workload(512, 32), Buffers(separate_gpu=True)
    print(f"hardware: {FLEXGEN_T4.summary()}")
    print(f"workload: prompt {workload.prompt_len}, {workload.gen_len} new tokens, "
          f"{args.num_prompts or 'whole blocks of'} prompts\n")
    for name in OPT:
        spec = spec_of(name)
        units = model_units(spec)
        for compression in (False, True):
            label = f"{name}{' with compression' if compression else ''}"
            started = time.perf_counter()
            plan = search(spec, [units], FLEXGEN_T4, dtypes=dtypes, workload=workload, buffers=buffers,
                          num_prompts=args.num_prompts, options=SearchOptions(allow_compression=compression))
            seconds = time.perf_counter() - started
            paper, measured = PAPER[(name, compression)]
            paper_place = plan_placement(spec, units, paper, dtypes=dtypes, workload=workload, buffers=buffers)
            paper_est = estimate(paper_place, FLEXGEN_T4, args.num_prompts)
            ours = plan.placement.bytes_per_tier()
            print(f"== {label}  (search: {seconds:.1f} s, {plan.candidates_tried} linear programs)")
            print(f"  ours : {policy_flags(plan.policy)}")
            print(f"         predicted {describe(plan.estimate)}")
            print(f"         bytes: " + ", ".join(f"{t} {format_size(ours[t])}" for t in Tier))
            print(f"  paper: {policy_flags(paper)}")
            print(f"         predicted {describe(paper_est)}; {fit_note(paper_place)}")
            print(f"         measured by the paper: {measured} tok/s\n")


if __name__ == "__main__":
    main()
