"""Named machines to plan for without having them (`--hardware NAME`), and the `--hardware` lookup.

FLEXGEN_T4 is the paper's machine (Sheng et al., FlexGen, ICML 2023, arXiv 2303.06865, Sec. 1 and
Sec. 6 "Hardware"): one NVIDIA T4 with 16 GB, 208 GB of CPU DRAM and a 1.5 TB SSD, with the
constants FlexGen's own cost model was fitted to. Those come from `CostModelConfig` in
FMInference/FlexGen (renamed FlexLLMGen) `experimental/cost_model.py`, commented there "default
value aligned on google cloud T4", where GB = 1 << 30 and T = 1e12 (`flexgen/utils.py`). The
authors fitted them by gradient descent on real runs (the file's note 1), so they are effective
rates of FlexGen's kernels, not peak specifications. Flops are counted as in that file, which is
how `hardware.py` counts them too.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .hardware import Capacities, Hardware, Speeds

_GB = 1 << 30  # flexgen/utils.py: GB = 1 << 30
_T = 1e12  # flexgen/utils.py: T = 1e12

FLEXGEN_T4 = Hardware(
    name="flexgen-t4: FlexGen paper's GCP T4 machine, cost-model constants",
    capacities=Capacities(
        has_gpu=True,
        # The paper's 16 GB / 208 GB / 1.5 TB, in FlexGen's GB (2^30). Its cost model plans with
        # gmem = 15 GB, cmem = 204 GB, nmem = 1500 GB, each relaxed by alpha = 0.8.
        gpu_mem=16 * _GB,
        cpu_mem=208 * _GB,
        host_mem=208 * _GB,
        disk_mem=1500 * _GB,
    ),
    speeds=Speeds(
        compute_dtype="float16",  # OPT in fp16, as in the paper's runs
        h2d_bw=12.89 * _GB,  # ctog_bdw
        # gtoc_bdw_hidden (contiguous hidden states). The cost model charges KV-cache copies to
        # the host at gtoc_bdw_cache = 0.97 GB/s: strided copies of FlexGen's cache layout.
        d2h_bw=4.82 * _GB,
        disk_read_bw=0.473 * _GB,  # dtoc_bdw
        # ctod_bdw_g (= ctod_bdw_hidden_p); prefill cache writes use ctod_bdw_cache_p = 0.746 GB/s.
        disk_write_bw=2.015 * _GB,
        matmul_flops=21.24 * _T,  # mm_flops_p (prefill)
        decode_matmul_flops=4.3 * _T,  # mm_flops_g (decode)
        attention_flops=9.97 * _T,  # bmm_flops_p (prefill)
        decode_attention_flops=0.079 * _T,  # bmm_flops_g (decode)
        # cpu_flops: the base rate; the cost model scales it by 1 + c1*a*b - c2*a - c3*b with
        # a = log2(64 / gpu_batch_size)+, b = log2(4096 / hidden)+, c1..c3 = 0.0168, 0.0328, 0.0621.
        cpu_attention_flops=0.0123 * _T,
        # Not in FlexGen's cost model ("the support for quantization is incomplete"). ESTIMATE:
        # the fp16 memory rate its decode attention implies (bmm_flops_g reads 1 byte of fp16 KV
        # per flop: 79e9 B/s); dequantization is memory bound the same way.
        quantize_bw=0.079 * _T,
        dequantize_bw=0.079 * _T,
        # Not in FlexGen's cost model either (it leaves elementwise ops out). ESTIMATE: 60 % of
        # the T4's 320 GB/s memory bandwidth.
        elementwise_bw=0.192 * _T,
    ),
    notes=(
        "speeds: FlexGen experimental/cost_model.py CostModelConfig (fitted on GCP T4 runs)",
        "quantize_bw, dequantize_bw, elementwise_bw: estimates (not in FlexGen's cost model)",
    ),
)

PRESETS = {"flexgen-t4": FLEXGEN_T4}


def hardware_from_arg(text: str | Path) -> Hardware:
    """`--hardware`: a preset name (see PRESETS) or a JSON file written by the profiler."""
    if str(text) in PRESETS:
        return PRESETS[str(text)]
    if not Path(text).exists():
        raise UserError(f"--hardware {text}: no such file and not a preset name ({', '.join(PRESETS)}); give "
                        "one, or a JSON file written by python -m flexgen_dist.profile --out FILE")
    return Hardware.load(text)
