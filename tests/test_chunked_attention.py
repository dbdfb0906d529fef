"""Attention over a cache read a chunk of positions at a time (running softmax) equals attention
over the whole cache, also where a chunk holds no position a query may attend (a padding row, a
left pad longer than a chunk): such a chunk once gave NaN (exp(-inf + inf)) and stopped a run
with 4-bit caches whenever a block had padding rows."""

from __future__ import annotations

import pytest
import torch

from flexgen_dist import LLM, Policy, Runtime
from flexgen_dist.engine import kv_views
from flexgen_dist.model.layers import attention, chunked_attention
import tiny_models


@pytest.mark.parametrize("chunk", [256, 62, 16, 1])
def test_chunks_with_every_position_masked_change_nothing(chunk):
    gen = torch.Generator().manual_seed(0)
    B, nh, nkv, hd, L = 3, 4, 2, 8, 65
    q = torch.randn(B, nh, 1, hd, generator=gen)  # (B, nh, T, hd)
    k, v = torch.randn(B, nkv, L, hd, generator=gen), torch.randn(B, nkv, L, hd, generator=gen)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)  # (B, 1, T, S)
    mask[0, ..., :5] = False  # a short left pad
    mask[1, ..., :63] = False  # a padding row: little but itself
    want = attention(q, k, v, mask, 0.3)
    got = chunked_attention(q, lambda a, b: (k[:, :, a:b], v[:, :, a:b]), L, mask, 0.3, chunk)
    assert not torch.isnan(got).any()
    assert torch.allclose(got, want, atol=1e-6)


def test_a_compressed_cache_with_padding_rows_and_small_chunks_runs(tiny_models_cache, monkeypatch):
    model = tiny_models_cache["llama"]
    prompts = tiny_models.random_prompts([3, 14, 9], seed=2)  # left pads of up to 11; a 4th, padding row
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, compress_cache=True)

    def run():
        with LLM(str(model), policy=policy, runtime=Runtime(device="cpu")) as llm:
            return [o.output_ids for o in llm.generate(prompts, max_new_tokens=6).outputs]

    whole = run()
    monkeypatch.setattr(kv_views, "_chunk", lambda q, kv_dim, device, align=1: max(2, align))  # chunks wholly inside a pad
    assert run() == whole
