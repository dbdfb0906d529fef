"""Host memory page-locked in place (cudaHostRegister) is unregistered exactly once, after the
device has finished every copy queued on it, however its owner goes: closed, dropped without
close (garbage collected), or failing part-way through its construction. Checked on the CPU with
a recording stand-in for torch.cuda (tests/fake_cuda.py)."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch

from fake_cuda import FakeCuda
from flexgen_dist import LLM, Policy, Runtime
from flexgen_dist.engine.engine import Engine
from flexgen_dist.storage.slots import SlotPool

PORTABLE = 1  # cudaHostRegisterPortable


def _registered(cuda: FakeCuda) -> list[int]:
    return [ptr for _, ptr, _, _, _, err in cuda.calls("register") if err == 0]


def _unregistered(cuda: FakeCuda) -> list[int]:
    return [ptr for _, ptr, _ in cuda.calls("unregister")]


def _synchronized_before_unregistering(cuda: FakeCuda, index: int) -> bool:
    first = next(i for i, entry in enumerate(cuda.log) if entry[0] == "unregister")
    return ("synchronize", index) in cuda.log[:first]


def test_a_pool_dropped_without_close_is_unpinned_when_collected(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    pool = SlotPool(3, 4096, torch.device("cpu"), pin=torch.device("cuda:1"))
    registers = cuda.calls("register")
    assert len(registers) == 3
    assert all(flags & PORTABLE for _, _, _, flags, _, _ in registers)  # usable from every context
    assert {device for *_, device, _ in registers} == {1}  # in the compute device's context
    pool.cycle = pool  # only the cycle collector frees it
    del pool
    assert _unregistered(cuda) == []
    gc.collect()
    assert sorted(_unregistered(cuda)) == sorted(_registered(cuda))  # each exactly once
    assert _synchronized_before_unregistering(cuda, 1)


def test_close_then_drop_unregisters_each_slot_once(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    pool = SlotPool(2, 4096, torch.device("cpu"), pin=torch.device("cuda:0"))
    pool.close()
    assert sorted(_unregistered(cuda)) == sorted(_registered(cuda))
    assert _synchronized_before_unregistering(cuda, 0)
    pool.close()
    del pool
    gc.collect()
    assert len(_unregistered(cuda)) == 2


def test_a_failed_register_unpins_the_slots_pinned_before_it(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    cuda.register_errors = [0, 0, 2]  # the third slot fails (cudaErrorMemoryAllocation)
    with pytest.raises(RuntimeError, match="cudaHostRegister"):
        SlotPool(4, 4096, torch.device("cpu"), pin=torch.device("cuda:0"))
    assert len(_registered(cuda)) == 2
    assert sorted(_unregistered(cuda)) == sorted(_registered(cuda))


def test_a_weight_store_failing_after_pinning_unpins_its_arena(llama_dir, monkeypatch):
    from flexgen_dist.api.model_source import ModelSource
    from flexgen_dist.api.planner import Capacity, plan_for
    from flexgen_dist.planning.search import SearchOptions
    from flexgen_dist.storage.weights import WeightStore

    source = ModelSource.from_dir(llama_dir)
    policy = Policy(gpu_batch_size=2, w_gpu_percent=0, w_cpu_percent=100, cache_gpu_percent=0, cache_cpu_percent=100)
    plan = plan_for(source.spec, runtime=Runtime(device="cpu"), policy=policy, capacity=Capacity(),
                    options=SearchOptions(), offload_dir=None)
    cuda = FakeCuda(monkeypatch)
    calls = []

    def failing_get(ws):  # the checkpoint breaks after the host arena was pinned
        calls.append(ws)
        raise OSError("checkpoint read failed")

    monkeypatch.setattr(source.weights, "get", failing_get)
    with pytest.raises(OSError, match="checkpoint read failed") as failure:
        WeightStore(placement=plan.placement, units=plan.units, source=source.weights, device=torch.device("cuda:0"),
                    offload_dir=None, reader=None)
    assert calls and len(_registered(cuda)) == 1
    # unpinned before the error leaves the constructor (its traceback still holds the store)
    assert failure.value is not None and _unregistered(cuda) == _registered(cuda)
    assert _synchronized_before_unregistering(cuda, 0)


def test_an_llm_dropped_without_close_unpins_its_host_memory(llama_dir, tmp_path, monkeypatch):
    cuda = FakeCuda(monkeypatch)
    real_init = SlotPool.__init__

    def pinned_host_pools(self, count, nbytes, device, pin=None, order=None):  # as on a CUDA machine
        real_init(self, count, nbytes, device, pin=torch.device("cuda:0") if device.type == "cpu" else None, order=order)

    monkeypatch.setattr(SlotPool, "__init__", pinned_host_pools)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=100,
                    cache_gpu_percent=0, cache_cpu_percent=100)
    llm = LLM(llama_dir, policy=policy, offload_dir=tmp_path, runtime=Runtime(device="cpu"))
    llm.generate([[5] * 7, [9] * 3], max_new_tokens=3)
    assert _registered(cuda)
    del llm
    gc.collect()
    assert sorted(_unregistered(cuda)) == sorted(_registered(cuda))
    assert _synchronized_before_unregistering(cuda, 0)


def test_tear_down_synchronizes_the_device_before_freeing_kv_memory(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    walk = SimpleNamespace(states={})
    block_io = SimpleNamespace(close_pools=lambda check: cuda.record("close_pools"), close=None)
    engine = SimpleNamespace(device=torch.device("cuda:1"), block_io=block_io, _drop_loads=lambda walk: None)
    Engine._tear_down(engine, walk, failed=False)
    assert cuda.log.index(("synchronize", 1)) < cuda.log.index(("close_pools",))
