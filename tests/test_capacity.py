import pytest

from flexgen_dist import Policy, UserError
from flexgen_dist.planning.capacity import StageFootprint, fit_policy
from flexgen_dist.planning.sizes import format_size, parse_size

MiB = 2**20


def footprint(weight_mib=100, cache_mib=20):
    return StageFootprint(
        weight_numel=weight_mib * MiB // 4,
        max_unit_numel=MiB // 4,  # 1 MiB per layer in fp32
        compute_itemsize=4,
        storage_itemsize=2,
        cache_bytes=cache_mib * MiB,
        act_bytes=0,
    )


def test_everything_fits_on_the_gpu_tier():
    p = fit_policy(Policy(), footprint(), gpu_mem=200 * MiB, cpu_mem=0).policy
    assert (p.w_gpu_percent, p.cache_gpu_percent) == (100.0, 100.0)


def test_weights_spill_to_cpu_then_disk_and_never_exceed_capacity():
    fp = footprint(weight_mib=100, cache_mib=20)
    fit = fit_policy(Policy(), fp, gpu_mem=52 * MiB, cpu_mem=25 * MiB)
    p = fit.policy
    assert p.w_gpu_percent == pytest.approx(50.0, abs=0.1)  # 50 MiB free after the 2 MiB working set
    assert p.w_cpu_percent == pytest.approx(50.0, abs=0.1)  # 25 MiB of 16-bit copies = half the weights
    assert p.percents("w")[2] == pytest.approx(0.0, abs=0.2)
    used_gpu = fit.working_bytes + p.w_gpu_percent / 100 * 100 * MiB + p.cache_gpu_percent / 100 * 20 * MiB
    used_cpu = p.w_cpu_percent / 100 * 50 * MiB + p.cache_cpu_percent / 100 * 20 * MiB
    assert used_gpu <= 52 * MiB and used_cpu <= 25 * MiB
    # cache gets nothing: the tiers are full, so it goes to disk
    assert p.percents("cache")[2] > 99


def test_more_ranks_means_less_on_disk():
    one = fit_policy(Policy(), footprint(weight_mib=100), gpu_mem=60 * MiB, cpu_mem=0).policy
    half = fit_policy(Policy(), footprint(weight_mib=50), gpu_mem=60 * MiB, cpu_mem=0).policy
    assert one.percents("w")[2] > 40 and half.percents("w")[2] == 0


def test_capacity_below_working_set_is_a_clear_error():
    with pytest.raises(UserError, match="working set"):
        fit_policy(Policy(), footprint(), gpu_mem=MiB, cpu_mem=0)


@pytest.mark.parametrize("text, value", [("4G", 4 * 2**30), ("512MiB", 512 * MiB), ("1.5k", 1536), ("100", 100), ("2 GB", 2 * 1000**3)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_nonsense():
    with pytest.raises(UserError, match="not a size"):
        parse_size("lots", "--gpu-mem")
    assert format_size(3 * MiB) == "3.00 MiB"
