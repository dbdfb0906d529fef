"""The greedy capacity fit: every fitted policy's exact placement stays within the capacities."""

import pytest

from flexgen_dist import Policy, UserError
from flexgen_dist.planning.capacity import Capacity, fit_policy
from flexgen_dist.planning.layout import model_units
from flexgen_dist.planning.placement import Buffers, Dtypes, Tier, Workload, plan_placement
from flexgen_dist.planning.sizes import format_size, parse_size
from flexgen_dist.planning.spec import ModelSpec

MiB = 2**20

# An OPT-125M-shaped model with a smaller vocabulary (12 layers of 7M weights), sizes only: no weights.
SPEC = ModelSpec.from_config(dict(model_type="opt", hidden_size=768, num_attention_heads=12, ffn_dim=3072,
                                  num_hidden_layers=12, vocab_size=8192, max_position_embeddings=2048))


def builder(units=None, block=(4, 2)):
    units = units or model_units(SPEC)
    dtypes = Dtypes(compute="float32", storage="float16")
    buffers = Buffers(separate_gpu=False, prefetch_depth=1)

    def build(policy):
        policy = policy.replace(gpu_batch_size=block[0], num_gpu_batches=block[1])
        return plan_placement(SPEC, units, policy, dtypes=dtypes, workload=Workload(64, 32), buffers=buffers)

    return build


def test_everything_fits_on_the_gpu_tier():
    p = fit_policy(Policy(), Capacity(2**34, 0), builder())
    assert (p.w_gpu_percent, p.cache_gpu_percent) == (100.0, 100.0)


@pytest.mark.parametrize("gpu_mib, cpu_mib", [(200, 100), (120, 300), (100, 40), (300, 0)])
def test_fitted_placement_never_exceeds_capacity_and_fills_the_fast_tier(gpu_mib, cpu_mib):
    build = builder()
    cap = Capacity(gpu_mib * MiB, cpu_mib * MiB)
    p = fit_policy(Policy(), cap, build)
    used = build(p).bytes_per_tier(estimates=False)
    assert used[Tier.GPU] <= cap.gpu_mem and used[Tier.CPU] <= cap.cpu_mem
    # greedy: 0.1 % more weights on the gpu tier would not fit (unless all are there already)
    if p.w_gpu_percent < 100 and p.cache_gpu_percent == 0:
        more = build(p.replace(w_gpu_percent=p.w_gpu_percent + 0.1)).bytes_per_tier(estimates=False)
        assert more[Tier.GPU] > cap.gpu_mem
    assert p.percents("w")[2] >= 0 and p.w_gpu_percent + p.w_cpu_percent <= 100


def test_weights_spill_to_cpu_then_disk():
    build = builder()
    total_fp32 = sum(u.numel for u in model_units(SPEC)) * 4
    p = fit_policy(Policy(), Capacity(total_fp32 // 2, total_fp32 // 5), build)
    used = build(p).weight_bytes()
    # at most half the fp32 weights (less the working buffers); tensors move whole, so less than that
    assert 0.2 * total_fp32 < used[Tier.GPU] < 0.5 * total_fp32
    assert used[Tier.CPU] > 0 and used[Tier.DISK] > 0


def test_more_ranks_means_less_on_disk():
    units = model_units(SPEC)
    half = units[:7]  # the embedding and 6 layers: a 2-rank pipeline's first stage
    cap = Capacity(250 * MiB, 0)
    one = fit_policy(Policy(), cap, builder(units))
    first_of_two = fit_policy(Policy(), cap, builder(half))
    assert one.percents("w")[2] > 20 and first_of_two.percents("w")[2] == 0


def test_capacity_below_working_set_is_a_clear_error():
    with pytest.raises(UserError, match="working set"):
        fit_policy(Policy(), Capacity(MiB, 0), builder())


@pytest.mark.parametrize("text, value", [("4G", 4 * 2**30), ("512MiB", 512 * MiB), ("1.5k", 1536), ("100", 100), ("2 GB", 2 * 1000**3)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_nonsense():
    with pytest.raises(UserError, match="not a size"):
        parse_size("lots", "--gpu-mem")
    assert format_size(3 * MiB) == "3.00 MiB"
