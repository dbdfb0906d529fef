"""Compression in the engine: 4/8-bit weights and KV cache, 16-bit cache storage, sparse attention.

Tolerances are relative RMS errors of the logits (RMS of the difference over the RMS of the
uncompressed logits about their mean), on the tiny test models: they are built to make greedy
choices sharp (large weights, logits of std 10), which makes quantisation error as visible as it
gets. Measured on every architecture (4 prompts, first step that sees the compressed tensors):
4-bit weights 0.42..0.64, 8-bit weights 0.033..0.046, 4-bit cache (min-max) 0.11..0.28, 4-bit
cache (KIVI, groups of 4 slots) 0.042..0.106, 8-bit cache 0.007..0.014, fp16 cache 0.0004..0.001,
sparse attention keeping half 0.002..0.095. Each tolerance below is about 1.5x the worst measured. (On the bundled trained model, 4-bit weights
cost 1.2 % perplexity: see the README's table.)
"""

from __future__ import annotations

import pytest
import torch

import tiny_models
from flexgen_dist import LLM, Policy, Runtime
from flexgen_dist.engine import kv_views
from flexgen_dist.engine.sampling import Sampler
from flexgen_dist.model.layers import attention, sparse_attention
from flexgen_dist.planning.compression import CompressionConfig
from flexgen_dist.planning.placement import Tier
from flexgen_dist.storage.quantize import compressed_on_disk
from flexgen_dist.storage.tiers import DiskIO, DiskReader, DiskTensor, MemoryTensor

CPU = Runtime(device="cpu")
EIGHT = CompressionConfig(bits=8, cache_method="minmax")
MINMAX = CompressionConfig(cache_method="minmax")  # FlexGen's 4-bit cache: every slot along the head dim
KIVI_4 = CompressionConfig(group_size=4)
CASES = {  # name: (policy changes, step whose logits see the change, tolerance)
    "weights-4bit": (dict(compress_weight=True), 0, 1.0),
    "weights-8bit": (dict(compress_weight=True, compression=EIGHT), 0, 0.07),
    "cache-4bit": (dict(compress_cache=True, compression=MINMAX), 1, 0.42),
    # KIVI in groups of 4 slots (and 4 values along the head dim): the prompts' groups are
    # quantized, the slots of the group being filled are not
    "cache-4bit-kivi": (dict(compress_cache=True, compression=KIVI_4), 1, 0.16),
    "cache-8bit": (dict(compress_cache=True, compression=EIGHT), 1, 0.021),
    "cache-fp16": (dict(cache_dtype="float16"), 1, 0.0015),
    "sparse-half": (dict(attn_sparsity=0.5), 1, 0.15),
}
TIERS = {  # weights and cache on each tier, and mixed
    "gpu": dict(),
    "cpu": dict(w_gpu_percent=0, w_cpu_percent=100, cache_gpu_percent=0, cache_cpu_percent=100),
    "disk": dict(w_gpu_percent=0, w_cpu_percent=0, cache_gpu_percent=0, cache_cpu_percent=0),
    "mixed": dict(w_gpu_percent=30, w_cpu_percent=30, cache_gpu_percent=34, cache_cpu_percent=33),
}


class RecordingSampler(Sampler):
    """Greedy, keeping the logits of every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[torch.Tensor] = []

    def __call__(self, logits, seq_ids):
        self.steps.append(logits.detach().clone())
        return super().__call__(logits, seq_ids)


def step_logits(model, policy: Policy, prompts, tmp_path, monkeypatch, steps=2) -> list[torch.Tensor]:
    samplers = []
    monkeypatch.setattr("flexgen_dist.api.generation.Sampler",
                        lambda *args, **kwargs: samplers.append(RecordingSampler(*args, **kwargs)) or samplers[-1])
    with LLM(model, policy=policy, offload_dir=tmp_path, runtime=CPU) as llm:
        llm.generate(prompts, max_new_tokens=steps)
    return samplers[-1].steps


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).pow(2).mean().sqrt() / (want - want.mean(-1, keepdim=True)).pow(2).mean().sqrt())


def compressed_logit_error(model, case: str, tmp_path, monkeypatch) -> float:
    """The relative logit error of compression `case` (CASES) on `model`, at the first step that sees it."""
    changes, step, _ = CASES[case]
    prompts = tiny_models.random_prompts([5, 12, 9, 16], seed=1)
    base = Policy(gpu_batch_size=4)
    want = step_logits(model, base, prompts, tmp_path / "plain", monkeypatch)[step]
    got = step_logits(model, base.replace(**changes), prompts, tmp_path / "compressed", monkeypatch)[step]
    return relative_error(got, want)


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
@pytest.mark.parametrize("case", list(CASES))
def test_compressed_logits_within_tolerance(arch, case, tiny_models_cache, tmp_path, monkeypatch):
    tolerance = CASES[case][2]
    error = compressed_logit_error(tiny_models_cache[arch], case, tmp_path, monkeypatch)
    assert 0 < error < tolerance, f"{case} on {arch}: relative logit error {error:.4f} (tolerance {tolerance})"


@pytest.mark.parametrize("case", ["weights-4bit", "cache-4bit", "cache-4bit-kivi", "cache-fp16", "sparse-half"])
def test_every_tier_gives_the_same_compressed_result(case, llama_dir, tmp_path, monkeypatch):
    """The same quantized bytes on every tier: in place (gpu, cpu) or through scratch (disk) the
    logits agree to float rounding, and exactly for weights (dequantized the same way)."""
    changes, step, _ = CASES[case]
    prompts = tiny_models.random_prompts([5, 12, 9, 16], seed=2)
    steps = 6 if "kivi" in case else 4  # KIVI: a group of 4 slots completed in decoding, then another begun
    results = {name: step_logits(llama_dir, Policy(gpu_batch_size=2, num_gpu_batches=2, **tiers, **changes),
                                 prompts, tmp_path / name, monkeypatch, steps=steps)
               for name, tiers in TIERS.items()}
    for name, steps in results.items():
        for got, want in zip(steps, results["gpu"]):
            if case == "weights-4bit":
                assert torch.equal(got, want), name
            else:
                assert relative_error(got, want) < 1e-5, name


def test_compressed_and_plain_runs_never_share_offload_files(llama_dir, tmp_path):
    disk = TIERS["disk"]
    folders = []
    for policy in (Policy(**disk), Policy(compress_weight=True, **disk), Policy(compress_weight=True, compression=EIGHT, **disk)):
        with LLM(llama_dir, policy=policy, offload_dir=tmp_path, runtime=CPU) as llm:
            llm.generate([[5, 6, 7]], max_new_tokens=2)
            folders.append(llm.weights.disk_dir)
            files = sum(p.stat().st_size for p in llm.weights.disk_dir.glob("*.bin"))
            assert files == llm.placement.weight_bytes()[Tier.DISK]
    assert len(set(folders)) == 3
    sizes = [sum(p.stat().st_size for p in folder.glob("*.bin")) for folder in folders]
    assert sizes[1] < sizes[2] < sizes[0]  # 4-bit, 8-bit, fp32 checkpoint stored as is


def test_sparse_attention_keeping_everything_is_dense_attention():
    torch.manual_seed(0)
    B, nh, nkv, S, hd = 2, 4, 2, 9, 8
    q = torch.randn(B, nh, 1, hd)
    k, v = torch.randn(S, B, nkv, hd), torch.randn(S, B, nkv, hd)  # (S, B, nkv, hd): the cache layout
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., :3] = False  # left padding of the second row
    keys, values = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
    want = attention(q, keys, values, mask, 0.3)
    got = sparse_attention(q, lambda qg: qg @ keys.transpose(-1, -2), S, mask, 0.3, 1.0,
                           lambda pos: kv_views._gather_values(v, pos, nkv, torch.device("cpu")), values[:, :, -1:])
    assert torch.allclose(got, want, atol=1e-5)


def test_sparse_attention_uses_only_the_values_of_the_top_positions():
    torch.manual_seed(2)
    S, hd = 21, 8  # one sequence, one head: keeping half = the 10 largest of the 20 past weights
    q, k, v = torch.randn(1, 1, 1, hd), torch.randn(S, 1, 1, hd), torch.randn(S, 1, 1, hd)
    keys, mask = k.permute(1, 2, 0, 3), torch.ones(1, 1, 1, S, dtype=torch.bool)

    def sparse_with(values_cache):
        return sparse_attention(q, lambda qg: qg @ keys.transpose(-1, -2), S, mask, 0.3, 0.5,
                                lambda pos: kv_views._gather_values(values_cache, pos, 1, torch.device("cpu")),
                                values_cache.permute(1, 2, 0, 3)[:, :, -1:])

    weights = (q @ keys.transpose(-1, -2) * 0.3).softmax(-1)[0, 0, 0]
    kept = weights[:-1].topk(10).indices.tolist()
    unused = [p for p in range(S - 1) if p not in kept]
    first = sparse_with(v)
    changed = v.clone()
    changed[unused] += 100.0
    assert torch.allclose(sparse_with(changed), first)
    changed[kept[0]] += 100.0
    assert not torch.allclose(sparse_with(changed), first)


@pytest.mark.parametrize("kind", ["memory", "disk", "compressed-disk"])
def test_values_are_gathered_from_their_tier(kind, tmp_path):
    torch.manual_seed(1)
    S, B, nkv, hd, nh = 12, 2, 2, 64, 4
    v = torch.randn(S, B, nkv, hd)
    reader = DiskReader(DiskIO(threads=1), 1 << 16)
    if kind == "memory":
        source = MemoryTensor(v, Tier.CPU)
    elif kind == "disk":
        source = DiskTensor(tmp_path / "v.bin", v.shape, torch.float32, reader)
        source.write(slice(None), v)
    else:
        source = compressed_on_disk(tmp_path / "v", v.shape, EIGHT, reader)
        source.write(slice(None), v)
    positions = torch.tensor([[[3, 4, 0], [11, 3, 5], [7, 8, 9], [1, 2, 10]]] * B)  # (B, nh, k)
    got = kv_views._gather_values(source, positions, nkv, torch.device("cpu"))
    want = kv_views._gather_values(v, positions, nkv, torch.device("cpu"))
    assert got.shape == (B, nh, 3, hd)
    tolerance = 0.05 if kind == "compressed-disk" else 0.0  # 8-bit: within half a quantisation step
    assert (got - want).abs().max() <= tolerance
