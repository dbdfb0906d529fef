"""Device identity, dtype choice, and the process group's timeout."""

import pytest
import torch

from flexgen_dist import Pipeline, Runtime, UserError
from flexgen_dist.parallel.comm import process_group_timeout
from flexgen_dist.parallel.context import DistContext
from flexgen_dist.spec.model import ModelSpec


def test_cpu_device_and_fp32_compute_on_the_cpu():
    spec = ModelSpec.from_config(dict(model_type="llama", hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                      num_hidden_layers=2, vocab_size=100, dtype="bfloat16"))
    runtime = Runtime(device="cpu")
    device = runtime.resolve_device()
    assert device == torch.device("cpu")
    assert runtime.dtypes(spec, device).compute == "float32" and runtime.dtypes(spec, device).storage == "bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_user_error(name):
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        Runtime(device=name).resolve_device()


@pytest.mark.parametrize("name, fragment", [("gpu", "not a device"), ("meta", "not supported")])
def test_unknown_devices_are_refused(name, fragment):
    with pytest.raises(UserError, match=fragment):
        Runtime(device=name).resolve_device()


def test_process_group_outlasts_the_engines_bounded_wait(monkeypatch):
    seen = []
    monkeypatch.setattr(DistContext, "init_process_group", lambda self, timeout_s: seen.append(timeout_s))
    monkeypatch.setattr("flexgen_dist.parallel.comm.PipeComm.__init__", lambda self, *a, **k: None)
    for backend in ("nccl", "gloo"):
        ctx = DistContext(rank=0, world_size=2, local_rank=0, master_addr="127.0.0.1", master_port=29500,
                          backend=backend, device="cpu", launcher="torchrun")
        Pipeline.start(ctx, timeout_s=30)
    # under NCCL the engine's waits (30 s) fire first and name the peer; the process group's own
    # timeout, which aborts the process, comes well after. gloo only raises in the waiting call.
    assert seen == [process_group_timeout(30, "nccl"), 30] and seen[0] >= 2 * 30
