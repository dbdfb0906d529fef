"""KIVI's KV cache (storage/kivi.py): keys quantized per channel over groups of cache slots,
values per token, the slots of the group being filled kept in full precision until the group
is complete; in memory and on disk, round the refill ring, and through the engine."""

from __future__ import annotations

import math

import pytest
import torch

from flexgen_dist import LLM, Policy, Runtime
from flexgen_dist.planning.compression import CompressionConfig
from flexgen_dist.planning.placement import Tier
from flexgen_dist.planning.tiers import cache_parts, pack
from flexgen_dist.storage.quantize import compressed_in_memory
from flexgen_dist.storage.kivi import KiviTensor, kivi_in_memory, kivi_on_disk
from flexgen_dist.storage.quantize import empty_quantized
from flexgen_dist.storage.tiers import DiskIO, DiskReader

_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


def make_kivi(which: str, shape, config: CompressionConfig, where: str, tmp_path, valid=None) -> KiviTensor:
    """A KIVI cache tensor of `shape` (S, B, nkv, hd): its parts carved from one buffer as a
    block's slot holds them, or files."""
    if where == "disk":
        reader = DiskReader(DiskIO(threads=1), 1 << 16)
        return kivi_on_disk(which, tmp_path / f"cache_{which}", shape, config, torch.float32, reader, valid)
    pieces, nbytes = pack(cache_parts("c", which, shape, config, "float32"))
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    views = {}
    for piece in pieces:
        dtype = _DTYPES[piece.dtype]
        views[piece.part] = buffer[piece.offset : piece.offset + math.prod(piece.shape) * dtype.itemsize].view(dtype).view(piece.shape)
    return kivi_in_memory(which, views, shape, config, Tier.GPU, valid)


def read(t: KiviTensor, a: int, b: int) -> torch.Tensor:
    out = torch.empty((b - a, *t.shape[1:]))
    return t.read_into(out, slice(a, b))


def window_span(t: KiviTensor) -> tuple[int, int]:
    """The slots the window holds, as one range (they are consecutive before the ring wraps)."""
    ranges = t.window_ranges()
    for (_, stop, _), (start, _, _) in zip(ranges, ranges[1:]):
        assert stop == start
    return (ranges[0][0], ranges[-1][1]) if ranges else (0, 0)


@pytest.mark.parametrize("where", ["memory", "disk"])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_the_window_is_exact_and_a_group_is_quantized_once_the_window_is_full(where, groups, tmp_path):
    """A window of `groups` groups holds the newest slots from the start of the group `groups` - 1
    before the newest: exactly as written; the group before is quantized once, when the newest
    group is complete and the step stored (its attention read the window as it was)."""
    torch.manual_seed(0)
    S, B, nkv, hd, G = 22, 2, 2, 8, 4  # the last group of slots is [20, 22): two slots
    config = CompressionConfig(group_size=G, cache_window=groups * G)
    x = torch.randn(S, B, nkv, hd)
    k = make_kivi("k", x.shape, config, where, tmp_path)
    k.write(slice(0, 10), x[:10])  # a prefill: groups [0, 4) and [4, 8) whole, [8, 10) being filled
    assert window_span(k) == (max(0, 3 - groups) * G, 10)
    for slot in range(10, S):
        k.write(slice(slot, slot + 1), x[slot : slot + 1])
        newest, complete = slot // G, slot + 1 in (S, (slot // G + 1) * G)
        assert window_span(k) == (max(0, newest - groups + 1) * G, slot + 1)  # what this step's attention reads
        start, stop = window_span(k)
        assert torch.equal(read(k, 0, slot + 1)[start:], x[start : slot + 1])
        k.seal()  # the step's store: a full window makes room
        start, stop = window_span(k)
        held = groups - 1 if complete else groups
        assert (start, stop) == ((max(0, newest - held + 1) * G, slot + 1) if held else (0, 0))
        got = read(k, 0, slot + 1)
        quantized = got[: start if stop else slot + 1]
        if len(quantized):
            assert not torch.equal(quantized, x[: len(quantized)])
            assert (quantized - x[: len(quantized)]).abs().max() < 0.6  # 4 bits over a few sigma
        assert torch.equal(got[start:stop], x[start:stop])


def test_keys_keep_a_range_per_channel():
    """One channel 100x the others (keys' outlier channels): grouped along the head dim (min-max)
    it sets every channel's scale; per channel over slots (KIVI) the others keep their own."""
    torch.manual_seed(1)
    S, B, nkv, hd = 64, 1, 1, 32
    x = torch.randn(S, B, nkv, hd)
    x[..., 3] *= 100
    config = CompressionConfig(group_size=32)
    k = make_kivi("k", x.shape, config, "memory", None)
    k.write(slice(0, S), x)
    minmax = CompressionConfig(group_size=32, cache_method="minmax")
    q = empty_quantized(x.shape, minmax)
    plain = compressed_in_memory((q.data, q.scale, q.mins), x.shape, minmax, Tier.GPU)
    plain.write(slice(0, S), x)
    others = [c for c in range(hd) if c != 3]
    kivi_error = (read(k, 0, S) - x)[..., others].abs().mean()
    minmax_error = (plain.read_into(torch.empty(x.shape)) - x)[..., others].abs().mean()
    assert kivi_error < 0.1 * minmax_error


def test_slots_without_a_token_do_not_widen_a_channel_range():
    torch.manual_seed(2)
    S, B, nkv, hd = 8, 2, 1, 4
    x = torch.randn(S, B, nkv, hd)
    x[1, 0] = 1e4  # row 0's slot 1 holds no token (left padding)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, 1] = False
    k = make_kivi("k", x.shape, CompressionConfig(group_size=8), "memory", None, valid)
    k.write(slice(0, S), x)
    got = read(k, 0, S)
    assert (got - x)[[0, 2, 3, 4, 5, 6, 7], 0].abs().max() < 0.2  # as if slot 1 were not there
    assert (got - x)[:, 1].abs().max() < 0.2


@pytest.mark.parametrize("where", ["memory", "disk"])
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("groups", [1, 2])
def test_every_slot_reads_back_round_the_ring(where, which, groups, tmp_path):
    """The engine's writes of a refilled block: a prefill, then one slot a step round a ring of
    S slots, and every few steps a new prompt in one row, written into the L slots ending at the
    step's, behind the newest (all rows read and written back, as StoredKV.write_rows does). Each
    slot reads back what was last written there: exactly in the window, within 8-bit error in
    the quantized groups; the window holds the group of the newest slot."""
    torch.manual_seed(3)
    S, B, nkv, hd, G, W, L = 14, 3, 1, 8, 4, 6, 5
    config = CompressionConfig(bits=8, group_size=G, cache_window=groups * G)
    t = make_kivi(which, (S, B, nkv, hd), config, where, tmp_path)
    want = torch.randn(S, B, nkv, hd)
    t.write(slice(0, W), want[:W])
    written = W
    for step in range(1, 40):
        slot = (W + step - 1) % S
        want[slot] = torch.randn(B, nkv, hd)
        t.write(slice(slot, slot + 1), want[slot : slot + 1])
        written = max(written, slot + 1)
        if step % 3 == 0:  # row 1 takes a new prompt: slots slot - L + 1 .. slot, in runs
            slots = [(slot - i) % S for i in reversed(range(L))]
            for run in _runs(slots):
                part = t.read_into(torch.empty((len(run), B, nkv, hd)), slice(run[0], run[-1] + 1)).clone()
                part[:, 1] = torch.randn(len(run), nkv, hd)
                want[run[0] : run[-1] + 1, 1] = part[:, 1]
                t.write(slice(run[0], run[-1] + 1), part)
        t.seal()
        got = read(t, 0, written)
        assert (got - want[:written]).abs().max() < 0.03, f"step {step}"
        for start, stop, _ in t.window_ranges():
            assert torch.equal(got[start:stop], want[start:stop])
        newest = t.window_ranges()[-1] if t.window_ranges() else None
        assert newest is None or newest[0] == slot // G * G


def _runs(slots: list[int]) -> list[list[int]]:
    runs = [[slots[0]]]
    for s in slots[1:]:
        if s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def test_gathered_values_come_from_the_window_where_it_holds_them():
    from flexgen_dist.engine.kv_views import _gather_values

    torch.manual_seed(4)
    S, B, nkv, hd = 12, 2, 2, 8
    v = torch.randn(S, B, nkv, hd)
    t = make_kivi("v", v.shape, CompressionConfig(group_size=8, cache_window=0), "memory", None)
    t.write(slice(0, 11), v[:11])  # [0, 8) quantized, [8, 11) in the window
    positions = torch.tensor([[[3, 9, 0], [10, 2, 8], [7, 8, 9], [1, 2, 10]]] * B)  # (B, nh, k)
    got = _gather_values(t, positions, nkv, torch.device("cpu"))
    want = _gather_values(read(t, 0, 11), positions, nkv, torch.device("cpu"))
    assert torch.equal(got, want)
    in_window = positions >= 8
    assert torch.equal(got[in_window], _gather_values(v, positions, nkv, torch.device("cpu"))[in_window])


@pytest.mark.parametrize("sparsity", [1.0, 0.5])
@pytest.mark.parametrize("groups", [1, 2])
def test_attention_over_the_keys_as_stored_is_attention_over_the_keys_read_back(sparsity, groups, monkeypatch):
    """Decode attention over a KIVI cache in place (StoredKV) multiplies the queries by whole
    groups of keys as they are stored, (n, B, nkv, hd, G): the same attention as over the keys
    and values read back in position order, at every step round a ring of S slots (S not a
    multiple of G, so the last group is shorter; after the wrap the window lies between groups),
    in chunks of two groups."""
    from flexgen_dist.engine import kv_views
    from flexgen_dist.engine.kv_views import DenseKV, StoredKV

    torch.manual_seed(5)
    S, B, nkv, nh, hd, G, W = 22, 2, 2, 4, 8, 4, 9
    config = CompressionConfig(group_size=G, cache_window=groups * G)
    k, v = (make_kivi(which, (S, B, nkv, hd), config, "memory", None) for which in "kv")
    monkeypatch.setattr(kv_views, "_chunk", lambda *args, **kwargs: 2 * G)
    grouped = []
    monkeypatch.setattr(KiviTensor, "read_groups", lambda self, *a, _f=KiviTensor.read_groups: grouped.append(a[:2])
                        or _f(self, *a))
    for t, x in ((k, torch.randn(W, B, nkv, hd)), (v, torch.randn(W, B, nkv, hd))):
        t.write(slice(0, W), x)
    for step in range(30):
        slot = (W + step) % S
        filled = S if step + W >= S else slot + 1
        q = torch.randn(B, nh, 1, hd)
        k_new, v_new = torch.randn(B, nkv, 1, hd), torch.randn(B, nkv, 1, hd)
        mask = torch.ones(B, 1, 1, filled, dtype=torch.bool)
        mask[0, ..., 1] = False  # a padding slot of row 0
        stored = StoredKV(k, v, torch.device("cpu"), sparsity)
        stored.write(slice(slot, slot + 1), k_new, v_new)
        got = stored.attend(q, mask, 0.3, slice(slot, slot + 1) if filled == slot + 1 else slice(filled - 1, filled))
        dense = DenseKV(read(k, 0, filled), read(v, 0, filled), torch.device("cpu"), sparsity)
        dense._v_new = v_new
        want = dense.attend(q, mask, 0.3, slice(filled - 1, filled))
        assert torch.allclose(got, want, atol=1e-5), f"step {step}"
        k.seal(), v.seal()
    assert len(grouped) > 30 and any(stop - first == 2 for first, stop in grouped)


def test_a_cache_shorter_than_a_group_gives_the_uncompressed_tokens(llama_dir, tmp_path, monkeypatch, hf_greedy,
                                                                   unambiguous_prompts):
    """Groups of 64 slots and sequences of at most 24: no group is ever complete, every slot is
    read from the window in full precision: transformers' greedy tokens, the uncompressed logits
    (to float rounding: attention over a stored cache runs in chunks), in memory and on disk."""
    from test_compression import relative_error, step_logits

    monkeypatch.setattr("test_compression.CPU", Runtime(device="cpu", compute_dtype="float32"))
    prompts = unambiguous_prompts(llama_dir, [5, 12, 9, 16], 8)
    want = [hf_greedy(llama_dir, p, 8) for p in prompts]
    base = Policy(gpu_batch_size=2, num_gpu_batches=2)
    plain = step_logits(llama_dir, base, prompts, tmp_path / "plain", monkeypatch, steps=8)
    for name, policy in (("kivi", base.replace(compress_cache=True)),
                         ("kivi-disk", base.replace(compress_cache=True, cache_gpu_percent=0, cache_cpu_percent=0))):
        got = step_logits(llama_dir, policy, prompts, tmp_path / name, monkeypatch, steps=8)
        assert all(relative_error(a, b) < 1e-5 for a, b in zip(got, plain)), name
        with LLM(llama_dir, policy=policy, offload_dir=tmp_path / name, runtime=Runtime(device="cpu")) as llm:
            assert [list(o.output_ids) for o in llm.generate(prompts, max_new_tokens=8).outputs] == want, name


@pytest.mark.parametrize("refill", [False, True])
def test_two_ranks_give_the_one_process_tokens(refill, tiny_models_cache, tmp_path, monkeypatch):
    """Groups of 4 slots on every tier (gpu, cpu and disk caches), three blocks of many widths,
    through a pipeline of two ranks: each rank's caches complete and quantize their groups as
    one process's do. With refill a pipeline keeps a block per rank open (one lane each), so the
    later prompts take other rows at other steps than in one process: their positions fall
    otherwise in the ring's groups of slots, and the tokens agree within the 4 bits' tolerance."""
    import test_engine_pipeline

    runtime = Runtime(device="cpu", refill=refill)
    monkeypatch.setattr(test_engine_pipeline, "CPU", runtime)
    model = tiny_models_cache.get("llama", num_hidden_layers=4)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=40, w_cpu_percent=30, cache_gpu_percent=50,
                    cache_cpu_percent=25, compress_cache=True, compression=CompressionConfig(group_size=4))
    prompts = [[5 + i % 7] * n for i, n in enumerate((3, 11, 6, 9, 4, 8, 5, 12, 7, 10, 2))]
    with LLM(model, policy=policy, offload_dir=tmp_path / "one", runtime=runtime) as llm:
        want = [o.output_ids for o in llm.generate(prompts, max_new_tokens=6).outputs]
    got, _ = test_engine_pipeline.run_pipeline(model, policy, prompts, 6, 2, tmp_path)
    got = [o.output_ids for o in got.outputs]
    if not refill:
        assert got == want
    assert [len(o) for o in got] == [len(o) for o in want]
    assert sum(a == b for g, w in zip(got, want) for a, b in zip(g, w)) >= 0.8 * sum(map(len, want))


def test_the_window_is_given_in_slots_and_rounded_up_to_whole_groups():
    from flexgen_dist.errors import UserError
    from flexgen_dist.planning.compression import cache_window_shape

    assert [CompressionConfig(group_size=64, cache_window=w).window_groups for w in (0, 1, 64, 65, 128)] == [1, 1, 1, 2, 2]
    assert CompressionConfig(group_size=32).window_groups == 4  # the default 128 slots
    assert cache_window_shape((1000, 2, 2, 8), CompressionConfig(group_size=32)) == (128, 2, 2, 8)
    assert cache_window_shape((40, 2, 2, 8), CompressionConfig(group_size=32)) == (64, 2, 2, 8)  # two groups, the second short
    assert cache_window_shape((20, 2, 2, 8), CompressionConfig(group_size=32)) == (20, 2, 2, 8)  # one short group
    with pytest.raises(UserError, match="cache_window"):
        CompressionConfig(cache_window=-1)
