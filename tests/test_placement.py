"""The placement's byte counts are what the engine allocates: measured on the real tensors and
files of a run (storage sizes, file sizes), not on process RSS."""

from __future__ import annotations

import os

import pytest
import torch

from flexgen_dist import LLM, Policy, Runtime, Workload
from flexgen_dist.engine.block_io import BlockIO
from flexgen_dist.spec.layout import model_units
from flexgen_dist.planning.place import plan_placement
from flexgen_dist.planning.placement import Buffers, Dtypes, Tier
from flexgen_dist.spec.model import ModelSpec
from flexgen_dist.planning.compression import CompressionConfig
from flexgen_dist.storage.quantize import CompressedTensor
from flexgen_dist.storage.kivi import KiviTensor
from flexgen_dist.storage.tiers import DiskIO, DiskTensor, MemoryTensor

# Weights, KV cache and activations on every tier, several GPU batches.
EVERY_TIER = Policy(gpu_batch_size=2, num_gpu_batches=3, w_gpu_percent=30, w_cpu_percent=30,
                    cache_gpu_percent=34, cache_cpu_percent=33, act_gpu_percent=34, act_cpu_percent=33)


def tensor_bytes(t) -> tuple[Tier, int]:
    """(tier, bytes it really takes): a memory tensor's storage, a disk tensor's file, the sum
    of a compressed tensor's parts."""
    if isinstance(t, (CompressedTensor, KiviTensor)):  # KIVI's: the quantized parts and the window
        return t.tier, sum(tensor_bytes(part)[1] for part in t.parts)
    if isinstance(t, DiskTensor):
        return Tier.DISK, os.stat(t.path).st_size
    assert isinstance(t, MemoryTensor)
    return t.tier, t.data.untyped_storage().nbytes()


def by_tier(pairs) -> dict[Tier, int]:
    out = dict.fromkeys(Tier, 0)
    for tier, n in pairs:
        out[tier] += n
    return out


@pytest.mark.parametrize("arch", ["llama", "opt", "opt-wide-vocab"])  # the last streams its head in chunks
@pytest.mark.parametrize("policy", [EVERY_TIER, EVERY_TIER.replace(cpu_cache_compute=True, num_gpu_batches=2),
                                    EVERY_TIER.replace(compress_weight=True, compress_cache=True),
                                    # KIVI: keys in groups of 4 slots (the last one shorter), windows of 4
                                    EVERY_TIER.replace(compress_cache=True, compression=CompressionConfig(group_size=4)),
                                    EVERY_TIER.replace(compress_weight=True, compress_cache=True,
                                                       compression=CompressionConfig(cache_method="minmax")),
                                    EVERY_TIER.replace(cache_dtype="float16", attn_sparsity=0.5)],
                         ids=["every-tier", "cpu-attention", "compressed", "kivi-groups-of-4", "compressed-minmax",
                              "fp16-cache-sparse"])
def test_planned_bytes_equal_allocated_bytes(request, tiny_models_cache, tmp_path, monkeypatch, arch, policy):
    wide = arch == "opt-wide-vocab"
    model = tiny_models_cache.get("opt", vocab_size=2048) if wide else request.getfixturevalue(f"{arch}_dir")
    prompt_len, new_tokens = 9, 5
    opened = []  # per block opened: (KV cache bytes per tier, activation file bytes), measured while open
    real_open = BlockIO.open

    def measuring_open(self, block, *start):
        state = real_open(self, block, *start)
        # memory tiers: the slot the block's caches were carved from; disk: the files
        caches = by_tier([(tier, slot.data.untyped_storage().nbytes()) for tier, slot in state.cache_slots.items()]
                         + [tensor_bytes(t) for kv in state.caches.values() for t in (kv.k, kv.v) if t.tier is Tier.DISK])
        for kv in state.caches.values():
            for t in (kv.k, kv.v):
                if t.tier is not Tier.DISK:  # views into its tier's slot, not tensors of their own
                    slot = state.cache_slots[t.tier].data
                    views = [p.data for p in t.parts] if isinstance(t, (CompressedTensor, KiviTensor)) else [t.data]
                    assert all(slot.data_ptr() <= v.data_ptr() < slot.data_ptr() + slot.numel() for v in views)
                    assert isinstance(t, KiviTensor) == (kv.place.compressed and policy.compression.cache_method == "kivi")
        acts = sum(os.stat(home.file.path).st_size for home in state.acts.values() if home.file is not None)
        opened.append((caches, acts))
        return state

    monkeypatch.setattr(BlockIO, "open", measuring_open)
    scratch_bytes = []  # the KV scratch pool's real size, measured before it is freed at the end of a run
    real_close_pools = BlockIO.close_pools

    def measuring_close_pools(self, check=True):
        if self.scratch is not None:
            scratch_bytes.append(sum(s.data.untyped_storage().nbytes() for s in self.scratch.slots))
        real_close_pools(self, check)

    monkeypatch.setattr(BlockIO, "close_pools", measuring_close_pools)
    runtime = Runtime(device="cpu", workload=Workload(prompt_len, new_tokens), disk_io=DiskIO(threads=2, chunk_bytes=64 << 10))
    with LLM(model, policy=policy, offload_dir=tmp_path, runtime=runtime) as llm:
        plan = llm.placement
        head = plan.weights[max(plan.weights)][-1]
        assert (head.chunk_rows is not None) == wide
        prompts = [[5 + i] * prompt_len for i in range(2 * policy.block_size)]  # two full blocks of equal width
        llm.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)

        # weights: every tensor where the plan says, in the bytes it says
        arenas = [(tier, pool.slots[0].data.untyped_storage().nbytes()) for tier, pool in llm.weights.arenas.items()]
        files = {t.path: tensor_bytes(t) for placed in llm.weights.tensors.values() for t in placed.values()
                 if isinstance(t, DiskTensor)}  # a tied head on disk reads the table's file
        files.update({p.path: tensor_bytes(p) for placed in llm.weights.tensors.values() for t in placed.values()
                      if isinstance(t, CompressedTensor) and t.tier is Tier.DISK for p in t.parts})
        assert by_tier(arenas + list(files.values())) == plan.weight_bytes()
        for layer_idx, placed in llm.weights.tensors.items():
            for place in plan.weights[layer_idx]:
                t = placed[place.name]
                assert t.tier is place.tier
                if place.tier is Tier.DISK:
                    assert tensor_bytes(t) == (Tier.DISK, place.nbytes)
                else:  # views into its tier's arena, of the planned size
                    arena = llm.weights.arenas[place.tier].slots[0].data
                    views = [p.data for p in t.parts] if isinstance(t, CompressedTensor) else [t.data]
                    assert all(arena.data_ptr() <= v.data_ptr() < arena.data_ptr() + arena.numel() for v in views)
                    assert sum(v.numel() * v.element_size() for v in views) == place.nbytes
                assert isinstance(t, CompressedTensor) == place.compressed
        # one block's KV cache and activation files, per tier (the second block lent its prompts
        # to the first one's rows: continuous refill opens one block per lane)
        assert len(opened) == 1
        for caches, act_files in opened:
            assert caches == {tier: n // plan.blocks_in_flight for tier, n in plan.cache_bytes().items()}
            assert act_files == plan.act_bytes()[Tier.DISK]
        assert plan.cache_bytes()[Tier.DISK] > 0 and plan.act_bytes()[Tier.DISK] > 0
        # working buffers: weight slots, KV scratch pairs, read buffers
        slots = sum(s.data.untyped_storage().nbytes() for s in llm.weights.slots.slots)
        assert slots == plan.buffer("weight slots").nbytes
        needs_scratch = any(not c.in_place for c in plan.caches.values())
        assert scratch_bytes == ([plan.buffer("kv scratch").nbytes] if needs_scratch else [])
        assert sum(b.untyped_storage().nbytes() for b in llm.reader.buffers) == plan.buffer("read buffers").nbytes


def test_every_slot_and_scratch_pair_is_back_after_a_run(llama_dir, tmp_path, monkeypatch):
    from flexgen_dist.storage.slots import SlotPool

    pools = []
    real_init = SlotPool.__init__
    monkeypatch.setattr(SlotPool, "__init__", lambda self, *a, **k: pools.append(self) or real_init(self, *a, **k))
    policy = EVERY_TIER.replace(w_gpu_percent=0, w_cpu_percent=50)
    with LLM(llama_dir, policy=policy, offload_dir=tmp_path, runtime=Runtime(device="cpu")) as llm:
        prompts = [[7] * n for n in (3, 11, 6, 9, 4, 8, 5)]  # blocks of different widths
        llm.generate(prompts, max_new_tokens=4, stop_token_ids=list(range(4, 300)))  # every row stops at once
        llm.generate(prompts, max_new_tokens=6)
        assert llm.weights.slots.num_free == len(llm.weights.slots.slots)
        io = llm.engine.block_io
        assert io.scratch is None and io.cache_pools == {}  # freed at the end of each run
        assert len(pools) >= 1 + 2 * 3  # weight slots; per run: scratch pairs and a cache pool per memory tier
        assert all(pool.num_free == len(pool.slots) for pool in pools[1:])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("cache-")], "a block's scratch folder was left"


def _spec():
    return ModelSpec.from_config(dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, num_hidden_layers=3, vocab_size=100))


@pytest.mark.parametrize("separate_gpu", [False, True])
def test_attention_in_place_where_the_cache_is_readable(separate_gpu):
    spec = _spec()
    units = model_units(spec)
    dtypes = Dtypes("float32", "float16")

    def plan(policy):
        return plan_placement(spec, units, policy, dtypes=dtypes, workload=Workload(8, 4),
                              buffers=Buffers(separate_gpu=separate_gpu))

    on_cpu = Policy(cache_gpu_percent=0, cache_cpu_percent=100)
    assert all(c.in_place for c in plan(Policy()).caches.values())
    # a host-memory cache is read in place on a CPU machine, or with CPU attention beside a GPU
    assert all(c.in_place != separate_gpu for c in plan(on_cpu).caches.values())
    assert all(c.in_place for c in plan(on_cpu.replace(cpu_cache_compute=True)).caches.values())
    assert not any(c.in_place for c in plan(Policy(cache_gpu_percent=0)).caches.values())  # disk
    assert "kv scratch" not in [b.name for b in plan(Policy()).working]


def test_placement_counts_each_block_in_flight_and_every_batch():
    spec = _spec()
    units = model_units(spec)
    policy = Policy(gpu_batch_size=3, num_gpu_batches=2)
    one = plan_placement(spec, units, policy, dtypes=Dtypes("float32", "float32"),
                         workload=Workload(10, 6), buffers=Buffers(separate_gpu=False))
    two = plan_placement(spec, units, policy, dtypes=Dtypes("float32", "float32"),
                         workload=Workload(10, 6), buffers=Buffers(separate_gpu=False, num_ranks=2))
    per_block = spec.num_layers * 2 * 2 * 16 * 3 * spec.kv_dim * 4  # layers x batches x (k, v) x seq x batch x kv_dim x fp32
    assert one.cache_bytes()[Tier.GPU] == per_block
    assert two.cache_bytes()[Tier.GPU] == 2 * per_block
    # receives and sends of every batch: a prompt of 10, or a refill step's rows and new prompts (11)
    assert two.buffer("send/recv").nbytes == 2 * 2 * 3 * 11 * spec.hidden_size * 4
    weights = sum(u.numel for u in units) * 4
    assert one.weight_bytes() == {Tier.GPU: weights, Tier.CPU: 0, Tier.DISK: 0}


def test_scoring_plans_the_logits_of_every_prompt_position():
    """`LLM.score` keeps the head's fp32 logits of every prompt position (B, P, V): a scoring
    placement counts them, so its working bytes grow with the prompt; generation keeps one
    position's."""
    spec = ModelSpec.from_config(dict(model_type="opt", hidden_size=64, ffn_dim=128, num_attention_heads=4,
                                      num_hidden_layers=2, vocab_size=4096, max_position_embeddings=512))
    units = model_units(spec)

    def gpu_working(prompt_len: int, scoring: bool) -> int:
        plan = plan_placement(spec, units, Policy(gpu_batch_size=2), dtypes=Dtypes("float32", "float32"),
                              workload=Workload(prompt_len, 1), buffers=Buffers(separate_gpu=False, scoring=scoring))
        return plan.working_bytes()[Tier.GPU]

    lengths = (16, 32, 64, 128)
    scored = [gpu_working(n, scoring=True) for n in lengths]
    assert scored == sorted(scored) and len(set(scored)) == len(scored)
    for n, planned in zip(lengths, scored):
        assert planned >= 2 * n * spec.vocab_size * 4  # the logits alone
        assert planned > gpu_working(n, scoring=False)


@pytest.mark.parametrize("planned_for_scoring", [True, False], ids=["planned-scoring", "planned-generation"])
def test_a_score_runs_planned_bytes_cover_its_logits(tiny_models_cache, monkeypatch, planned_for_scoring):
    from flexgen_dist.engine.engine import Engine
    from flexgen_dist.model.opt import OptMath

    model = tiny_models_cache.get("opt", vocab_size=2048)
    logits = []  # storage bytes of every logits tensor the head returned
    real_head = OptMath.head
    monkeypatch.setattr(OptMath, "head", lambda self, w, x, step: logits.append(out := real_head(self, w, x, step))
                        or out)
    used = []  # the placement each engine run was handed
    real_run = Engine.run
    monkeypatch.setattr(Engine, "run", lambda self, *a, **k: used.append(k["placement"]) or real_run(self, *a, **k))
    prompt_len, policy = 24, Policy(gpu_batch_size=2, num_gpu_batches=1)
    runtime = Runtime(device="cpu", workload=Workload(prompt_len, 1), scoring=planned_for_scoring)
    with LLM(model, policy=policy, runtime=runtime) as llm:
        scores = llm.score([[5 + i] * prompt_len for i in range(2)])
    assert [len(s) for s in scores] == [prompt_len - 1] * 2
    [placement] = used
    assert placement.buffers.scoring and (placement is llm.placement) == planned_for_scoring  # re-sized when not
    biggest = max(t.untyped_storage().nbytes() for t in logits)
    assert biggest == 2 * prompt_len * 2048 * 4  # (B, P, V) fp32
    assert placement.buffer("compute workspace").nbytes >= biggest
    as_generation = plan_placement(placement.spec, placement.units, placement.policy, dtypes=placement.dtypes,
                                   workload=placement.workload, buffers=Buffers(separate_gpu=False))
    assert as_generation.buffer("compute workspace").nbytes < biggest  # what the plan missed before


def test_a_call_is_sized_once_in_the_front_end_and_the_engine_never_plans(llama_dir, monkeypatch):
    from flexgen_dist.engine.engine import Engine
    from flexgen_dist.api import llm as api
    from flexgen_dist.planning import fit, place

    running, sized = [], []

    def planning(real):
        def wrapped(*args, **kwargs):
            assert not running, f"{real.__name__} called while the engine runs"
            return real(*args, **kwargs)
        return wrapped

    for module, name in ((place, "plan_placement"), (fit, "check_policy"), (api, "check_policy")):
        monkeypatch.setattr(module, name, planning(getattr(module, name)))
    real_plan = api.plan_placement
    monkeypatch.setattr(api, "plan_placement", planning(lambda *a, **k: sized.append(k["workload"]) or real_plan(*a, **k)))
    real_run = Engine.run

    def run(self, *args, **kwargs):
        running.append(True)
        try:
            return real_run(self, *args, **kwargs)
        finally:
            running.pop()

    monkeypatch.setattr(Engine, "run", run)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2)
    with LLM(llama_dir, policy=policy, runtime=Runtime(device="cpu", workload=Workload(8, 4))) as llm:
        llm.generate([[5 + i] * 8 for i in range(4)], max_new_tokens=4)  # the workload planned for
        assert sized == []
        for _ in range(2):
            llm.generate([[7 + i] * 5 for i in range(4)], max_new_tokens=3)  # another one: sized once
        assert sized == [Workload(5, 3)]
        llm.score([[5 + i] * 6 for i in range(4)])
        assert sized == [Workload(5, 3), Workload(6, 1)]
