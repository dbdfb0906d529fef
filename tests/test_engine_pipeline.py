"""A pipeline of engines in one process, over an in-memory channel instead of torch.distributed:
the outputs equal one process's, and what the engine holds for messages stays bounded."""

from __future__ import annotations

import queue
import threading
import weakref

import pytest
import torch

from flexgen_dist import LLM, Policy, Runtime
from flexgen_dist.parallel.context import DistContext
from flexgen_dist.parallel.group import Pipeline

CPU = Runtime(device="cpu")


class _Send:
    def __init__(self):
        self.taken = threading.Event()

    def done(self) -> bool:
        return self.taken.is_set()

    def wait(self) -> None:
        assert self.taken.wait(60), "a send was never received"


class _Recv:
    def __init__(self, channel: queue.Queue, arrive):
        self._channel, self._arrive = channel, arrive

    def result(self) -> torch.Tensor:
        tensor, sent = self._channel.get(timeout=60)
        sent.taken.set()
        return self._arrive(tensor)


class Wire:
    """Channels between in-process ranks; a send completes when its receiver takes it."""

    def __init__(self, arrive=lambda tensor: tensor):
        self.arrive = arrive  # what a receiver gets for the tensor that was sent
        self.channels: dict[tuple, queue.Queue] = {}
        self.lock = threading.Lock()
        self.live_sends: dict[int, weakref.WeakSet] = {}
        self.peak_live_sends: dict[int, int] = {}

    def channel(self, src: int, dst: int, tag: int) -> queue.Queue:
        with self.lock:
            return self.channels.setdefault((src, dst, tag), queue.Queue())


class LoopbackPipeline(Pipeline):
    """A Pipeline whose exchanges between ranks go through a barrier instead of a process group."""

    def __init__(self, ctx, wire: "Wire", barrier: threading.Barrier, shared: list):
        super().__init__(ctx, timeout_s=60)
        self.comm = LoopbackComm(wire, ctx.rank, ctx.world_size)
        self._barrier, self._shared = barrier, shared

    def gather(self, obj, what: str = "plans") -> list:
        self._shared[self.rank] = obj
        self._barrier.wait(60)
        every = list(self._shared)
        self._barrier.wait(60)
        return every


class LoopbackComm:
    def __init__(self, wire: Wire, rank: int, world_size: int):
        self.wire, self.rank, self.world_size = wire, rank, world_size
        wire.live_sends[rank] = weakref.WeakSet()
        wire.peak_live_sends[rank] = 0

    def send(self, tensor, dst, tag):
        handle = _Send()
        self.wire.channel(self.rank, dst, tag).put((tensor.detach().clone(), handle))
        live = self.wire.live_sends[self.rank]
        live.add(handle)  # alive while the engine keeps the handle
        self.wire.peak_live_sends[self.rank] = max(self.wire.peak_live_sends[self.rank], len(live))
        return handle

    def recv(self, shape, dtype, src, tag):
        return _Recv(self.wire.channel(src, self.rank, tag), self.wire.arrive)


def run_ranks(model, policy, ranks, tmp_path, body, wire=None) -> tuple[dict, "Wire"]:
    """`body(llm)` on every rank of an in-process pipeline (threads over `wire`): {rank: its result}."""
    wire = wire or Wire()
    barrier, shared = threading.Barrier(ranks), [None] * ranks
    results, errors = {}, []

    def rank_main(rank: int) -> None:
        try:
            ctx = DistContext(rank=rank, world_size=ranks, local_rank=rank, master_addr="127.0.0.1",
                              master_port=29500, backend="gloo", device="cpu", launcher="torchrun")
            pipeline = LoopbackPipeline(ctx, wire, barrier, shared)
            with LLM(model, policy=policy, offload_dir=tmp_path / f"rank{rank}", runtime=CPU, pipeline=pipeline) as llm:
                results[rank] = body(llm)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results, wire


def run_pipeline(model, policy, prompts, max_new_tokens, ranks, tmp_path, wire=None, **generate):
    results, wire = run_ranks(model, policy, ranks, tmp_path,
                              lambda llm: llm.generate(prompts, max_new_tokens=max_new_tokens, **generate), wire)
    return results[0], wire


@pytest.mark.parametrize("ranks", [2, 3])
def test_pipeline_equals_one_process_and_keeps_few_sends(tiny_models_cache, tmp_path, ranks):
    llama_dir = tiny_models_cache.get("llama", num_hidden_layers=4)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=40, w_cpu_percent=30,
                    cache_gpu_percent=50, cache_cpu_percent=25)
    prompts = [[5 + i % 7] * n for i, n in enumerate((3, 11, 6, 9, 4, 8, 5, 12, 7, 10, 2))]  # 3 blocks of many widths
    with LLM(llama_dir, policy=policy, offload_dir=tmp_path / "one", runtime=CPU) as llm:
        want = [o.output_ids for o in llm.generate(prompts, max_new_tokens=6).outputs]
    got, wire = run_pipeline(llama_dir, policy, prompts, 6, ranks, tmp_path)
    assert [o.output_ids for o in got.outputs] == want
    # A rank keeps the handles of sends not yet received, never the whole run's (3 blocks x 6
    # tokens of them): at most the messages of the tasks in flight (the ring lets a rank run
    # `ranks` tasks ahead): per task, per GPU batch its hidden states and, when some of its rows
    # start a waiting prompt (refill), theirs; and the control message saying whether the block is
    # live. (Under load more of them are in flight at once: 8 of 2 ranks' 10 were seen.)
    for rank, peak in wire.peak_live_sends.items():
        assert 1 <= peak <= ranks * (2 * policy.num_gpu_batches + 1), (rank, peak)


def test_a_block_whose_rows_all_stopped_ends_on_every_rank(tiny_models_cache, tmp_path, monkeypatch):
    from flexgen_dist.engine.engine import Engine

    model = tiny_models_cache.get("llama", num_hidden_layers=4)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2)
    prompts = [[5 + i] * n for i, n in enumerate((3, 9, 6, 4, 8, 5, 7, 2))]  # 2 blocks of 4
    stop = list(range(300))  # every token stops its row: each sequence ends with its first token
    with LLM(model, policy=policy, runtime=CPU) as llm:
        want = [o.output_ids for o in llm.generate(prompts, max_new_tokens=8, stop_token_ids=stop).outputs]
    computed: dict[str, set] = {}
    real = Engine._run_unit

    def counting(self, op, walk, state, weights, past):
        computed.setdefault(threading.current_thread().name, set()).add((op.block_idx, op.token_idx, op.batch_idx))
        return real(self, op, walk, state, weights, past)

    monkeypatch.setattr(Engine, "_run_unit", counting)
    got, _ = run_pipeline(model, policy, prompts, 8, 2, tmp_path, stop_token_ids=stop)
    assert [o.output_ids for o in got.outputs] == want and all(len(ids) == 1 for ids in want)
    assert len(computed) == 2
    for thread, tasks in computed.items():
        # the prefill of each block, and on the first rank at most the first GPU batch of the next
        # token (computed before the last batch's tokens came back and showed that every row stopped)
        beyond = {t for t in tasks if t[1] > 0}
        assert len(beyond) <= 2 * (policy.num_gpu_batches - 1), (thread, sorted(beyond))
        assert {(b, 0, k) for b in range(2) for k in range(2)} <= tasks


class OnAnotherDevice(torch.Tensor):
    """What NCCL hands a receiver: a tensor on another device than the one the engine computes
    on (under NCCL, the GPU while token state lives on the host). Using it in any way other than
    moving it with `.to(device=...)` fails, as mixing devices does on a GPU."""

    misuses: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        with torch._C.DisableTorchFunctionSubclass():
            if name == "__get__" or name in ("__repr__", "__format__"):  # .shape, .dtype, printing
                return func(*args, **kwargs)
            if func is torch.Tensor.to and ("device" in kwargs or any(
                    isinstance(a, (torch.device, str)) for a in args[1:])):
                out = func(*args, **kwargs)
                return out.as_subclass(torch.Tensor)
        cls.misuses.append(name)
        raise AssertionError(f"{name} on a tensor received from a peer before it was moved to the engine's device")


@pytest.mark.parametrize("ranks", [2, 3])
def test_tensors_from_peers_are_moved_to_the_engines_device_before_use(tiny_models_cache, tmp_path, ranks):
    """The first review's NCCL crash: rank 0 mixed token ids that arrived on the GPU with its
    host-side token state in a `torch.where`. Every received tensor (hidden states, token ids,
    control flags) must cross to the engine's side at the comm boundary, before any use."""
    model = tiny_models_cache.get("llama", num_hidden_layers=4)
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2)
    prompts = [[5 + i] * n for i, n in enumerate((3, 9, 6, 4, 8, 5))]
    with LLM(model, policy=policy, runtime=CPU) as llm:
        want = [o.output_ids for o in llm.generate(prompts, max_new_tokens=5).outputs]
    OnAnotherDevice.misuses.clear()
    wire = Wire(arrive=lambda tensor: tensor.as_subclass(OnAnotherDevice))
    got, _ = run_pipeline(model, policy, prompts, 5, ranks, tmp_path, wire=wire)
    assert not OnAnotherDevice.misuses
    assert [o.output_ids for o in got.outputs] == want
