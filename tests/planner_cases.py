"""Model shapes, machines and placements shared by the cost-model and search tests (no torch)."""

from __future__ import annotations

from flexgen_dist.machine.hardware import Capacities, Hardware, Speeds
from flexgen_dist.spec.layout import model_units
from flexgen_dist.planning.place import plan_placement
from flexgen_dist.planning.placement import Buffers, Dtypes, Workload
from flexgen_dist.planning.policy import Policy
from flexgen_dist.spec.model import ModelSpec

MiB, GiB = 2**20, 2**30


def opt_spec(hidden=64, heads=4, ffn=256, layers=4, vocab=512) -> ModelSpec:
    return ModelSpec.from_config(dict(model_type="opt", hidden_size=hidden, num_attention_heads=heads, ffn_dim=ffn,
                                      num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=256))


def llama_spec(layers=4) -> ModelSpec:
    return ModelSpec.from_config(dict(model_type="llama", hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                                      intermediate_size=344, num_hidden_layers=layers, vocab_size=1024,
                                      max_position_embeddings=512))


def gpu_machine(gpu_mem=GiB, cpu_mem=8 * GiB, disk_mem=100 * GiB) -> Hardware:
    """Round numbers, shaped like a PCIe GPU box: fast device, slow link, slower disk."""
    return Hardware(
        name="test gpu box",
        capacities=Capacities(has_gpu=True, gpu_mem=gpu_mem, cpu_mem=cpu_mem, host_mem=cpu_mem, disk_mem=disk_mem),
        speeds=Speeds(compute_dtype="float16", h2d_bw=1e10, d2h_bw=5e9, disk_read_bw=1e9, disk_write_bw=5e8,
                      matmul_flops=1e13, decode_matmul_flops=2e12, attention_flops=5e12, decode_attention_flops=1e11,
                      cpu_attention_flops=2e10, quantize_bw=5e10, dequantize_bw=1e11, elementwise_bw=5e10),
    )


def cpu_machine(host_mem=GiB, disk_mem=100 * GiB) -> Hardware:
    """A machine without a GPU: both memory tiers are host RAM."""
    return Hardware(
        name="test cpu box",
        capacities=Capacities(has_gpu=False, gpu_mem=host_mem, cpu_mem=host_mem, host_mem=host_mem, disk_mem=disk_mem),
        speeds=Speeds(compute_dtype="float32", h2d_bw=8e9, d2h_bw=8e9, disk_read_bw=1.5e9, disk_write_bw=1e9,
                      matmul_flops=2e11, decode_matmul_flops=4e10, attention_flops=5e10, decode_attention_flops=5e9,
                      cpu_attention_flops=5e9, quantize_bw=2e9, dequantize_bw=4e9, elementwise_bw=5e10),
    )


def settings(hardware: Hardware, prompt_len=16, gen_len=8, num_ranks=1) -> dict:
    """dtypes, workload and buffers of a run on this machine."""
    gpu = hardware.capacities.has_gpu
    return dict(dtypes=Dtypes("float16", "float16") if gpu else Dtypes("float32", "float16"),
                workload=Workload(prompt_len, gen_len),
                buffers=Buffers(separate_gpu=gpu, num_ranks=num_ranks, chunk_bytes=1 << 20))


def policy(percent=(100, 0, 100, 0, 100, 0), gbs=2, num_batches=2, **switches) -> Policy:
    w_gpu, w_cpu, c_gpu, c_cpu, a_gpu, a_cpu = percent
    return Policy(gpu_batch_size=gbs, num_gpu_batches=num_batches, w_gpu_percent=w_gpu, w_cpu_percent=w_cpu,
                  cache_gpu_percent=c_gpu, cache_cpu_percent=c_cpu, act_gpu_percent=a_gpu, act_cpu_percent=a_cpu,
                  **switches)


def place(spec: ModelSpec, pol: Policy, hardware: Hardware, units=None, **overrides):
    kwargs = {**settings(hardware), **overrides}
    return plan_placement(spec, units if units is not None else model_units(spec), pol, **kwargs)


def assert_plans_on_a_gpu_box_and_a_cpu_box(spec: ModelSpec, numel: int, *, gpu_mem: int, cpu_mem: int,
                                            host_mem: int) -> None:
    """A published model (`numel` weights in fp16) plans on a GPU machine and on a CPU one: the
    search finds a policy, its placement is the one plan_placement gives, every tensor is placed
    once (a tied head too), 2 bytes each with a GPU; on the CPU box those on the gpu tier (host
    memory) may be held in the fp32 compute dtype."""
    from flexgen_dist.spec.layout import UnitKind
    from flexgen_dist.planning.search import SearchOptions, search

    units = model_units(spec)
    assert sum(u.kind is UnitKind.BLOCK for u in units) == spec.num_layers
    for machine in (gpu_machine(gpu_mem=gpu_mem, cpu_mem=cpu_mem), cpu_machine(host_mem=host_mem)):
        st = settings(machine, prompt_len=256, gen_len=32)
        plan = search(spec, [units], machine, **st, num_prompts=64,
                      options=SearchOptions(gpu_batch_sizes=(4, 16), num_gpu_batches=(1, 4)))
        assert plan.estimate.throughput > 0
        placement = plan_placement(spec, units, plan.policy, **st)
        assert placement.weight_bytes() == plan.placement.weight_bytes()
        stored = sum(placement.weight_bytes().values())
        if machine.capacities.has_gpu:
            assert stored == 2 * numel
        else:
            assert 2 * numel <= stored <= 4 * numel


def layout_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of every tensor the layout reads (a tied head once)."""
    return {ws.key: ws.shape for unit in model_units(spec) for ws in unit.weights}
