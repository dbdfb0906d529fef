"""Inf / NaN flags of layer outputs are read one task late on a stage without the head, so the
host never waits for the device per batch and token; a block is read in full before it closes."""

from __future__ import annotations

import pytest
import torch

from flexgen_dist.engine.walk import FiniteWatch, TaskKey
from flexgen_dist.errors import UserError

LAYERS = range(3, 6)  # a middle stage: schedule layers 3..5, no head


def _watch():
    return FiniteWatch(LAYERS, torch.device("cpu"), lambda layer: f"decoder layer {layer - 1}", "float16")


def _run_task(watch, key, bad_layer=None, read_now=False):
    for layer in LAYERS:
        x = torch.ones(2, 4)
        if layer == bad_layer:
            x[1, 2] = float("nan")
        watch.note(key, layer, x)
    watch.task_done(key, read_now=read_now)


@pytest.fixture
def host_reads(monkeypatch):
    """Counts reads of a tensor's value by the host (each one a wait for the device on a GPU)."""
    reads = []
    for name in ("__bool__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads


def test_a_task_s_flags_are_not_read_while_it_is_the_newest(host_reads):
    watch = _watch()
    _run_task(watch, TaskKey(0, 0, 0))
    _run_task(watch, TaskKey(0, 0, 1))  # the same token: still the newest task
    assert host_reads == []
    _run_task(watch, TaskKey(0, 1, 0))  # the next token: token 0's flags are read now
    assert len(host_reads) == 2


def test_a_nan_is_named_one_task_late():
    watch = _watch()
    _run_task(watch, TaskKey(0, 0, 0), bad_layer=4)  # no error yet: nothing was read
    with pytest.raises(UserError, match=r"decoder layer 3 \(schedule layer 4\) holds inf or NaN at token 0 of block 0"):
        _run_task(watch, TaskKey(0, 1, 0))


def test_a_block_is_read_before_it_closes():
    watch = _watch()
    _run_task(watch, TaskKey(2, 0, 0))
    _run_task(watch, TaskKey(2, 1, 0), bad_layer=5)
    watch.read_block(1)  # another block: nothing of block 2 is read
    with pytest.raises(UserError, match=r"schedule layer 5\) holds inf or NaN at token 1 of block 2"):
        watch.read_block(2)


def test_the_head_stage_reads_at_once():
    watch = _watch()
    with pytest.raises(UserError, match="schedule layer 3"):
        _run_task(watch, TaskKey(0, 0, 0), bad_layer=3, read_now=True)
