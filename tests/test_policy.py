import pytest

from flexgen_dist import Policy, UserError
from flexgen_dist.planning.placement import Tier, choose_tiers


def test_defaults_keep_everything_on_the_compute_device():
    p = Policy()
    assert p.percents("w") == (100.0, 0.0, 0.0)
    assert p.block_size == 1


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"w_gpu_percent": 80, "w_cpu_percent": 30}, "over 100"),
        ({"cache_cpu_percent": -5}, "cache_cpu_percent must be a number from 0 to 100"),
        ({"act_gpu_percent": 101}, "act_gpu_percent"),
        ({"gpu_batch_size": 0}, "gpu_batch_size"),
        ({"num_gpu_batches": 1.5}, "num_gpu_batches"),
    ],
)
def test_invalid_policy_is_refused_with_what_to_change(kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        Policy(**kwargs)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"attn_sparsity": 0}, "attn_sparsity must be in"),
        ({"attn_sparsity": 1.5}, "attn_sparsity must be in"),
        ({"cache_dtype": "int8"}, "cache_dtype 'int8' is unknown"),
    ],
)
def test_compression_and_cache_fields_are_validated(kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        Policy(**kwargs)


def test_compression_bits_3_says_why():
    from flexgen_dist.planning.compression import CompressionConfig

    with pytest.raises(UserError, match="only 4 and 8 pack whole values into bytes"):
        Policy(compression=CompressionConfig(bits=3))


def test_policy_is_frozen():
    with pytest.raises(Exception):
        Policy().gpu_batch_size = 3


def test_choose_tiers_splits_by_cumulative_size():
    sizes = [10] * 10
    tiers = choose_tiers(sizes, (30, 30, 40))
    assert tiers == [Tier.GPU] * 3 + [Tier.CPU] * 3 + [Tier.DISK] * 4
    assert choose_tiers(sizes, (100, 0, 0)) == [Tier.GPU] * 10
    assert choose_tiers(sizes, (0, 0, 100)) == [Tier.DISK] * 10
    # one big tensor goes where its midpoint falls
    assert choose_tiers([1, 98, 1], (40, 60, 0)) == [Tier.GPU, Tier.CPU, Tier.CPU]
