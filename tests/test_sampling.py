"""The sampler copies a batch's logits to the host once, not once per sampled row (each copy is a
wait for the device on a GPU), and draws the same tokens as row-by-row sampling."""

from __future__ import annotations

import torch

from flexgen_dist.engine.sampling import RowSampling, Sampler, SamplingParams


def test_a_sampled_batch_is_copied_to_the_host_at_most_twice(monkeypatch):
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)) * 3
    seq_ids = [3, 1, -1, 4, 9, 2, 6, 5]  # one padding row
    copies = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        copies.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    got = Sampler(params)(logits, seq_ids)
    monkeypatch.undo()
    assert len(copies) <= 2, copies
    # the same draws as each row alone, from its own (seed, stream) generator
    for row_idx, seq_id in enumerate(seq_ids):
        if seq_id < 0:
            assert int(got[row_idx]) == int(logits[row_idx].argmax())
            continue
        alone = Sampler(params, rows={seq_id: RowSampling(params, stream=seq_id)})
        assert int(alone(logits[row_idx : row_idx + 1], [seq_id])[0]) == int(got[row_idx]), row_idx
