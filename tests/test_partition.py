"""Stage splitting: optimal against brute force, extras, overrides, bad input."""

from __future__ import annotations

import itertools
import random

import pytest

from flexgen_dist.cli.flags import parse_stage_layers
from flexgen_dist.parallel.partition import partition_layers
from flexgen_dist.errors import UserError


def stage_costs(costs, ranges, first_extra=0.0, last_extra=0.0):
    out = [sum(costs[layer_idx] for layer_idx in layers) for layers in ranges]
    out[0] += first_extra
    out[-1] += last_extra
    return out


def brute_force_best_max(costs, num_stages, first_extra=0.0, last_extra=0.0):
    num_layers = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, num_layers), num_stages - 1):
        bounds = (0, *cuts, num_layers)
        ranges = [range(bounds[i], bounds[i + 1]) for i in range(num_stages)]
        worst = max(stage_costs(costs, ranges, first_extra, last_extra))
        best = worst if best is None else min(best, worst)
    return best


def check_shape(ranges, num_layers, num_stages):
    assert len(ranges) == num_stages
    assert ranges[0].start == 0 and ranges[-1].stop == num_layers
    for left, right in zip(ranges, ranges[1:]):
        assert left.stop == right.start
    assert all(len(layers) >= 1 and layers.step == 1 for layers in ranges)


@pytest.mark.parametrize("seed", range(40))
def test_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    num_layers = rng.randint(1, 9)
    num_stages = rng.randint(1, num_layers)
    # Small integers make ties common, which exercises the tie-breaking; floats exercise rounding.
    if seed % 2:
        costs = [rng.randint(0, 5) for _ in range(num_layers)]
        first_extra, last_extra = rng.randint(0, 6), rng.randint(0, 6)
    else:
        costs = [rng.uniform(0.1, 3.0) for _ in range(num_layers)]
        first_extra, last_extra = rng.uniform(0, 4), rng.uniform(0, 4)
    ranges = partition_layers(costs, num_stages, first_extra=first_extra, last_extra=last_extra)
    check_shape(ranges, num_layers, num_stages)
    got = max(stage_costs(costs, ranges, first_extra, last_extra))
    assert got == pytest.approx(brute_force_best_max(costs, num_stages, first_extra, last_extra), rel=1e-12)


def test_uniform_layers_split_evenly():
    assert [len(r) for r in partition_layers([1.0] * 32, 4)] == [8, 8, 8, 8]
    assert [len(r) for r in partition_layers([1.0] * 32, 3)] in ([11, 11, 10], [11, 10, 11], [10, 11, 11])
    # Same max (3) as 3,3,3,1, but the most even split is chosen.
    assert sorted(len(r) for r in partition_layers([1.0] * 10, 4)) == [2, 2, 3, 3]


def test_embedding_and_head_costs_move_layers_off_the_ends():
    ranges = partition_layers([1.0] * 12, 3, first_extra=2.0, last_extra=2.0)
    assert max(stage_costs([1.0] * 12, ranges, 2.0, 2.0)) == 6.0  # 16 / 3 rounded up to a reachable cost
    assert len(ranges[1]) > len(ranges[0]) and len(ranges[1]) > len(ranges[2])
    heavy_head = partition_layers([1.0] * 8, 2, last_extra=4.0)
    assert [len(r) for r in heavy_head] == [6, 2]
    heavy_embedding = partition_layers([1.0] * 8, 2, first_extra=4.0)
    assert [len(r) for r in heavy_embedding] == [2, 6]


def test_single_stage_takes_everything():
    assert partition_layers([3.0, 1.0, 2.0], 1, first_extra=5.0, last_extra=5.0) == [range(0, 3)]


def test_one_layer_per_stage_when_stages_equal_layers():
    assert partition_layers([5.0, 0.0, 1.0], 3) == [range(0, 1), range(1, 2), range(2, 3)]


def test_zero_costs_still_give_every_stage_a_layer():
    ranges = partition_layers([0.0] * 5, 3)
    check_shape(ranges, 5, 3)


def test_deterministic():
    costs = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0]
    assert partition_layers(costs, 3) == partition_layers(list(costs), 3)


def test_eighty_layers_eight_stages():
    costs = [1.0] * 80
    ranges = partition_layers(costs, 8, first_extra=0.5, last_extra=1.5)
    check_shape(ranges, 80, 8)
    # 10.5 cannot be reached: stage 0 <= 10 layers, middle <= 10, last <= 9 holds only 79 layers.
    assert max(stage_costs(costs, ranges, 0.5, 1.5)) == 11.0


def test_too_many_stages():
    with pytest.raises(UserError, match="3 layers cannot be split over 4 ranks: use at most 3 ranks"):
        partition_layers([1.0, 1.0, 1.0], 4)


@pytest.mark.parametrize(
    ("costs", "stages", "kwargs", "message"),
    [
        ([], 1, {}, "no decoder layers"),
        ([1.0], 0, {}, "at least 1"),
        ([1.0, -1.0], 1, {}, "layer 1"),
        ([1.0, float("nan")], 1, {}, "layer 1"),
        ([1.0], 1, {"first_extra": -1.0}, "first_extra"),
        ([1.0], 1, {"last_extra": float("inf")}, "last_extra"),
    ],
)
def test_bad_input(costs, stages, kwargs, message):
    with pytest.raises(UserError, match=message):
        partition_layers(costs, stages, **kwargs)


def test_override_is_used_as_given():
    ranges = partition_layers([1.0] * 32, 3, override=[10, 12, 10])
    assert ranges == [range(0, 10), range(10, 22), range(22, 32)]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ([10, 12], "gives 2 stages but there are 3 ranks"),
        ([10, 12, 10, 0], "gives 4 stages"),
        ([16, 16, 0], "entry 2 is 0"),
        ([20, 14, -2], "entry 2 is -2"),
        ([10, 12, 8], "sums to 30 but the model has 32 decoder layers"),
    ],
)
def test_override_validation(override, message):
    with pytest.raises(UserError, match=message):
        partition_layers([1.0] * 32, 3, override=override)


def test_parse_stage_layers():
    assert parse_stage_layers("10,12,10") == [10, 12, 10]
    assert parse_stage_layers(" 4 , 4 ") == [4, 4]
    assert parse_stage_layers("7") == [7]


@pytest.mark.parametrize("text", ["", " ", "10,,12", "10,12,", "a,b", "1.5,2", "3,0", "3,-1"])
def test_parse_stage_layers_rejects(text):
    with pytest.raises(UserError, match="--stage-layers"):
        parse_stage_layers(text)


def test_errors_are_one_line():
    for call in (lambda: partition_layers([1.0] * 3, 4), lambda: parse_stage_layers("x")):
        with pytest.raises(UserError) as info:
            call()
        assert "\n" not in str(info.value)
