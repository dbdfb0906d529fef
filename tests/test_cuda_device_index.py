"""One process on `cuda:N`, N > 0: the device is made current when the model is built, and every
stream, event and capability question names it, instead of whatever device is current on the
asking thread (device 0 on a fresh one). Checked on the CPU with a recording stand-in for
torch.cuda (tests/fake_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from fake_cuda import FakeCuda
from flexgen_dist import LLM, Runtime
from flexgen_dist.engine.block_io import Loader
from flexgen_dist.spec.model import ModelSpec
from flexgen_dist.storage.slots import StreamOrder


def _bf16_spec() -> ModelSpec:
    return ModelSpec.from_config(dict(model_type="llama", hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                      num_hidden_layers=2, vocab_size=100, dtype="bfloat16"))


def test_the_device_is_set_when_the_model_is_built(llama_dir, monkeypatch):
    cuda = FakeCuda(monkeypatch, device_count=2)

    class Planned(Exception):
        pass

    def plan_for(*args, **kwargs):
        cuda.record("plan")
        raise Planned  # nothing further can be built without a GPU

    monkeypatch.setattr("flexgen_dist.api.llm.plan_for", plan_for)
    with pytest.raises(Planned):
        LLM(llama_dir, runtime=Runtime(device="cuda:1"))
    assert cuda.calls("set_device") == [("set_device", 1)]
    assert cuda.log.index(("set_device", 1)) < cuda.log.index(("plan",))  # before anything is allocated


def test_stream_order_uses_the_streams_of_its_device(monkeypatch):
    cuda = FakeCuda(monkeypatch, device_count=2)
    order = StreamOrder(torch.device("cuda:1"))  # this thread's current device is 0
    event = order.mark_released()
    order.wait_released(event)
    assert {index for _, index in cuda.calls("current_stream")} == {1}
    assert cuda.calls("event_record") == [("event_record", event.name, "default:1")]
    assert cuda.calls("wait_event") == [("wait_event", "default:1", event.name)]


def test_loads_run_on_a_stream_of_the_compute_device(monkeypatch):
    cuda = FakeCuda(monkeypatch, device_count=2)
    loader = Loader(workers=1, device=torch.device("cuda:1"), overlap=True)
    try:
        on = loader.submit(lambda: (cuda.stream_of_this_thread(1), cuda.current_device())).result()
    finally:
        loader.close()
    (_, name, index), = cuda.calls("new_stream")
    assert index == 1 and on == (name, 1)


@pytest.mark.parametrize("support, chosen", [("native", "bfloat16"), ("emulated", "float16"), ("none", "float16")])
def test_bfloat16_only_where_the_compute_device_has_it_natively(monkeypatch, support, chosen):
    cuda = FakeCuda(monkeypatch, device_count=2, bf16=support)
    dtypes = Runtime().dtypes(_bf16_spec(), torch.device("cuda:1"))
    assert dtypes.compute == chosen
    assert cuda.calls("is_bf16_supported") == [("is_bf16_supported", 1, False)]  # cuda:1, no emulation
