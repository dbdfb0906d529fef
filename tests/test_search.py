"""The policy search: its plans fit the exact placement, it does at least as well as a brute-force
scan, it honours --max-latency, and refusals (nothing fits, a hand policy too big) are one line."""

from __future__ import annotations

import itertools

import pytest
from planner_cases import GiB, MiB, cpu_machine, gpu_machine, llama_spec, opt_spec, place, policy, settings

from flexgen_dist.errors import UserError
from flexgen_dist.parallel.partition import partition_layers
from flexgen_dist.planning.cost_model import combine, estimate, estimate_pipeline, stage_times
from flexgen_dist.planning.fit import (
    PolicyDoesNotFit,
    RankProblem,
    check_policy,
    lattices,
    policy_flags,
    shortfalls,
    to_point,
    to_policy,
)
from flexgen_dist.planning.place import FoldedRank
from flexgen_dist.spec.layout import model_units
from flexgen_dist.planning.placement import Buffers, Dtypes, Tier
from flexgen_dist.planning.search import SearchOptions, search, switch_sets
from flexgen_dist.sizes import format_size

SMALL = opt_spec(layers=8, hidden=128, heads=2, ffn=512)
MIXED = [policy((30, 30, 34, 33, 50, 50), gbs=3, num_batches=3),
         policy((0, 60, 0, 50, 0, 100), gbs=2, num_batches=2, cpu_cache_compute=True),
         policy((50, 50, 25, 25, 100, 0), gbs=2, num_batches=2, compress_weight=True, compress_cache=True)]


def stages_of(spec, num_ranks):
    units = model_units(spec)
    blocks = units[1:-1]
    out = []
    for rank, layers in enumerate(partition_layers([1.0] * len(blocks), num_ranks)):
        mine = [blocks[i] for i in layers]
        out.append(([units[0]] if rank == 0 else []) + mine + ([units[-1]] if rank == num_ranks - 1 else []))
    return out


def full_bytes(spec, machine, frac_of_all_gpu, gbs=4, num_batches=2):
    """A capacity: this fraction of what everything on the gpu tier needs."""
    return int(place(spec, policy(gbs=gbs, num_batches=num_batches), machine).bytes_per_tier()[Tier.GPU] * frac_of_all_gpu)


@pytest.mark.parametrize("machine", [gpu_machine(), cpu_machine()], ids=["gpu", "cpu"])
@pytest.mark.parametrize("pol", MIXED, ids=["every-tier", "cpu-attention", "compressed"])
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_a_folded_rank_has_the_exact_bytes_and_times_of_the_whole(machine, pol, rank):
    units = stages_of(SMALL, 3)[rank]
    st = settings(machine, num_ranks=3)
    folded = FoldedRank.of(SMALL, units)
    assert len(folded.representatives) < len(units)
    small = folded.plan(pol, **st)
    whole = folded.plan_all(pol, **st)
    assert folded.bytes_per_tier(small) == whole.bytes_per_tier()
    fast = stage_times(small, machine, repeats=folded.repeats)
    exact = stage_times(whole, machine)
    for a, b in zip(fast.tasks(), exact.tasks()):
        assert a.seconds == pytest.approx(b.seconds, rel=1e-12) and a.send_s == b.send_s


def test_lattice_points_round_trip_to_the_same_tiers():
    for pol in MIXED + [policy((12.5, 40, 37.5, 12.5, 50, 0), gbs=2, num_batches=4)]:
        grids = lattices(FoldedRank.of(SMALL, model_units(SMALL)), pol)
        again = to_policy(to_point(pol, grids), pol, grids)
        a, b = place(SMALL, pol, gpu_machine()), place(SMALL, again, gpu_machine())
        assert [w.tier for ws in a.weights.values() for w in ws] == [w.tier for ws in b.weights.values() for w in ws]
        assert [(c.k_tier, c.v_tier) for c in a.caches.values()] == [(c.k_tier, c.v_tier) for c in b.caches.values()]
        assert [x.tier for x in a.acts] == [x.tier for x in b.acts]


CAPACITIES = [("gpu", 0.25), ("gpu", 0.6), ("gpu", 2.0), ("cpu", 0.35), ("cpu", 0.7), ("cpu", 2.0)]


@pytest.mark.parametrize("kind, frac", CAPACITIES)
@pytest.mark.parametrize("spec", [SMALL, llama_spec(layers=6)], ids=["opt", "llama"])
def test_the_plan_fits_the_exact_placement(kind, frac, spec):
    base = gpu_machine() if kind == "gpu" else cpu_machine()
    cap = full_bytes(spec, base, frac)
    machine = gpu_machine(gpu_mem=cap, cpu_mem=cap) if kind == "gpu" else cpu_machine(host_mem=cap)
    options = SearchOptions(gpu_batch_sizes=(1, 2, 4, 8), num_gpu_batches=(1, 2, 4), allow_compression=True)
    plan = search(spec, [model_units(spec)], machine, **settings(machine), num_prompts=40, options=options)
    assert not shortfalls(plan.placement.bytes_per_tier(), machine)
    assert plan.placement.policy == plan.policy and plan.candidates_tried > 0
    assert plan.estimate.throughput == pytest.approx(estimate(plan.placement, machine, 40).throughput, rel=1e-12)
    assert policy_flags(plan.policy) in plan.summary()


def test_a_pipeline_plan_shares_the_block_and_fits_every_rank():
    machine = gpu_machine(gpu_mem=full_bytes(SMALL, gpu_machine(), 0.2), cpu_mem=64 * MiB)
    stages = stages_of(SMALL, 2)
    st = settings(machine, num_ranks=2)
    plan = search(SMALL, stages, machine, **st, options=SearchOptions(gpu_batch_sizes=(1, 2, 4), num_gpu_batches=(1, 2)))
    assert len(plan.policies) == 2 and len({(p.gpu_batch_size, p.num_gpu_batches) for p in plan.policies}) == 1
    for placement in plan.placements:
        assert not shortfalls(placement.bytes_per_tier(), machine)
    assert plan.estimate.throughput == pytest.approx(estimate_pipeline(plan.placements, machine).throughput)
    with pytest.raises(ValueError, match="policies"):
        plan.policy


def _brute_force(problem, gbs, num_batches, gen_len):
    """The best throughput over every policy on a 10 % grid of all six percentages."""
    pairs = [(g, c) for g in range(0, 101, 10) for c in range(0, 101 - g, 10)]
    grids = lattices(problem.rank, policy(gbs=gbs, num_batches=num_batches))
    seen = {}
    for w, c, a in itertools.product(pairs, pairs, pairs):
        pol = policy(w + c + a, gbs=gbs, num_batches=num_batches)
        seen.setdefault(to_point(pol, grids), pol)  # policies with the same tiers cost the same
    best = 0.0
    for pol in seen.values():
        if not problem.shortfalls(pol):
            est = combine([problem.stage(pol)], block_size=pol.block_size, gen_len=gen_len, num_prompts=None)
            best = max(best, est.throughput)
    return best


@pytest.mark.parametrize("kind, frac", [("gpu", 0.4), ("cpu", 0.6)])
def test_the_search_is_at_least_as_good_as_a_brute_force_scan(kind, frac):
    base = gpu_machine() if kind == "gpu" else cpu_machine()
    cap = full_bytes(SMALL, base, frac, num_batches=1)
    machine = gpu_machine(gpu_mem=cap, cpu_mem=cap) if kind == "gpu" else cpu_machine(host_mem=cap)
    st = settings(machine, gen_len=4)
    problem = RankProblem(FoldedRank.of(SMALL, model_units(SMALL)), machine, **st)
    best = _brute_force(problem, 4, 1, gen_len=4)
    assert best > 0
    options = SearchOptions(gpu_batch_sizes=(4,), num_gpu_batches=(1,), allow_cpu_attention=False)
    plan = search(SMALL, [model_units(SMALL)], machine, **st, options=options)
    # The programs price decoding at its mean step and the final score uses every step, so two
    # policies a hair apart can swap; seen: 6e-5 relative (cpu, 0.6). Anything worse is a search bug.
    assert plan.estimate.throughput >= best * (1 - 1e-3)


def test_max_latency_excludes_slow_plans():
    machine = gpu_machine(gpu_mem=full_bytes(SMALL, gpu_machine(), 0.5), cpu_mem=GiB)
    st = settings(machine)
    options = dict(gpu_batch_sizes=(1, 2, 4, 8), num_gpu_batches=(1, 2, 4, 8))
    free = search(SMALL, [model_units(SMALL)], machine, **st, options=SearchOptions(**options))
    bound = free.estimate.block_s * 0.5
    bounded = search(SMALL, [model_units(SMALL)], machine, **st, options=SearchOptions(max_latency=bound, **options))
    assert bounded.estimate.block_s <= bound
    assert bounded.estimate.throughput <= free.estimate.throughput
    with pytest.raises(UserError, match="--max-latency") as err:
        search(SMALL, [model_units(SMALL)], machine, **st, options=SearchOptions(max_latency=1e-12, **options))
    assert "\n" not in str(err.value)


def test_an_impossible_capacity_is_one_line_naming_what_is_short():
    machine = gpu_machine(gpu_mem=64 << 10)
    with pytest.raises(UserError) as err:
        search(SMALL, [model_units(SMALL)], machine, **settings(machine))
    message = str(err.value)
    assert "\n" not in message and "gpu tier" in message and "64.00 KiB are available" in message


def test_check_policy_accepts_what_fits():
    machine = gpu_machine()
    assert check_policy(place(SMALL, MIXED[0], machine), machine) is None


def test_check_policy_names_the_tier_the_bytes_and_the_nearest_policy_that_fits():
    everything = policy(gbs=4, num_batches=2)
    cap = full_bytes(SMALL, gpu_machine(), 0.5)
    machine = gpu_machine(gpu_mem=cap, cpu_mem=GiB)
    hand = place(SMALL, everything, machine)
    with pytest.raises(PolicyDoesNotFit) as err:
        check_policy(hand, machine)
    e = err.value
    needed = hand.bytes_per_tier()[Tier.GPU]
    assert (e.where, e.needed, e.available) == ("gpu tier", needed, cap)
    message = str(e)
    assert "\n" not in message and format_size(needed) in message and format_size(cap) in message
    assert policy_flags(e.nearest) in message and "--percent" in message
    assert (e.nearest.gpu_batch_size, e.nearest.num_gpu_batches) == (4, 2)
    assert not shortfalls(place(SMALL, e.nearest, machine).bytes_per_tier(), machine)
    for kind in ("w", "cache", "act"):  # moved down, never up
        assert e.nearest.percents(kind)[0] <= everything.percents(kind)[0]


def test_check_policy_shrinks_a_block_that_cannot_fit_at_all():
    big = policy((0, 0, 0, 0, 0, 0), gbs=64, num_batches=8)
    smallest = place(SMALL, big.replace(gpu_batch_size=1, num_gpu_batches=1), gpu_machine())
    cap = smallest.bytes_per_tier()[Tier.GPU] * 2
    machine = gpu_machine(gpu_mem=cap)
    with pytest.raises(PolicyDoesNotFit) as err:
        check_policy(place(SMALL, big, machine), machine)
    nearest = err.value.nearest
    assert nearest.block_size < big.block_size
    assert not shortfalls(place(SMALL, nearest, machine).bytes_per_tier(), machine)


def test_switch_sets_follow_the_options_and_the_machine():
    base = policy()
    gpu, cpu = gpu_machine(), cpu_machine()
    fp16, fp32 = Dtypes("float16", "float16"), Dtypes("float32", "float16")
    assert len(switch_sets(base, SearchOptions(), gpu, fp16)) == 2  # CPU attention off / on
    assert len(switch_sets(base, SearchOptions(), cpu, fp32)) == 1  # no GPU: nothing to switch
    every = switch_sets(base, SearchOptions(allow_compression=True, allow_cache_16bit=True), cpu, fp32)
    assert {(p.compress_weight, p.compress_cache) for p in every} == set(itertools.product([False, True], repeat=2))
    assert {p.cache_dtype for p in every} == {None, "float16"}
    with_gpu = switch_sets(base, SearchOptions(allow_compression=True), gpu, fp16)
    assert not any(p.cpu_cache_compute and p.compress_cache for p in with_gpu)


def test_compression_is_chosen_when_it_pays_and_only_when_allowed():
    # little host memory and a slow disk: 4-bit weights fit in memory, 16-bit ones do not. Layers
    # enough that a dequantization's scratch (up to a weight in fp32 per loader thread) is small
    # beside a third of the weights on the GPU.
    spec = opt_spec(layers=32, hidden=256, heads=4, ffn=1024)
    weights = sum(u.numel for u in model_units(spec)) * 2
    machine = gpu_machine(gpu_mem=weights // 3, cpu_mem=weights // 2)
    st = settings(machine)
    grid = dict(gpu_batch_sizes=(1, 2, 4, 8), num_gpu_batches=(1, 2, 4))
    plain = search(spec, [model_units(spec)], machine, **st, options=SearchOptions(**grid))
    packed = search(spec, [model_units(spec)], machine, **st, options=SearchOptions(allow_compression=True, **grid))
    assert not plain.policy.compress_weight
    assert packed.policy.compress_weight and packed.estimate.throughput > plain.estimate.throughput


def test_buffers_and_ranks_must_agree():
    with pytest.raises(ValueError, match="num_ranks"):
        search(SMALL, stages_of(SMALL, 2), gpu_machine(), dtypes=Dtypes("float16", "float16"),
               workload=settings(gpu_machine())["workload"], buffers=Buffers(separate_gpu=True))
