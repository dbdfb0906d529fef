"""Ordering between the stream that last used a buffer and the stream that reuses it, checked on
the CPU with a recording stand-in for CUDA events: every reuse of a weight slot or KV scratch pair
waits for the event recorded when it was given back, and every load of a KV cache waits for the
event recorded after the store before it (a device-to-host copy may still be running)."""

from __future__ import annotations

import itertools
import threading

import torch

from flexgen_dist import LLM, Policy, Runtime
from flexgen_dist.storage.slots import SlotPool, StreamOrder


class RecordingOrder:
    """Events are numbers; what was marked and waited is logged with the thread that did it."""

    def __init__(self):
        self.counter = itertools.count(1)
        self.log: list[tuple[str, int | None, str]] = []
        self.lock = threading.Lock()

    def mark_released(self):
        with self.lock:
            event = next(self.counter)
            self.log.append(("mark", event, threading.current_thread().name))
            return event

    def wait_released(self, event) -> None:
        with self.lock:
            self.log.append(("wait", event, threading.current_thread().name))


def test_a_slot_is_rewritten_only_after_the_event_of_its_release():
    order = RecordingOrder()
    pool = SlotPool(1, 64, torch.device("cpu"), order=order)
    slot = pool.take()
    assert order.log == [("wait", None, threading.current_thread().name)]  # a fresh slot: nothing to wait for
    pool.give(slot)
    again = pool.take()
    assert again is slot and order.log[-2][0] == "mark" and order.log[-1] == ("wait", order.log[-2][1], order.log[-1][2])


def test_every_reuse_and_every_cache_load_waits_for_its_event(llama_dir, tmp_path, monkeypatch):
    order = RecordingOrder()
    monkeypatch.setattr(StreamOrder, "mark_released", lambda self: order.mark_released())
    monkeypatch.setattr(StreamOrder, "wait_released", lambda self, event: order.wait_released(event))
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=100,
                    cache_gpu_percent=0, cache_cpu_percent=0)  # weights loaded into slots, caches via scratch
    with LLM(llama_dir, policy=policy, offload_dir=tmp_path, runtime=Runtime(device="cpu")) as llm:
        llm.generate([[5] * 7, [9] * 3, [11] * 5], max_new_tokens=5)
    marks = [event for kind, event, _ in order.log if kind == "mark"]
    waited = [event for kind, event, _ in order.log if kind == "wait" and event is not None]
    assert len(marks) > 20
    # nothing waits on an event not yet recorded, and no recorded event is forgotten: each is
    # waited for by the next user of its slot or cache (except those recorded at the very end)
    assert all(order.log.index(("wait", event, name)) > order.log.index(("mark", event, mark_name))
               for kind, event, name in order.log if kind == "wait" and event is not None
               for mark_kind, mark_event, mark_name in order.log if mark_kind == "mark" and mark_event == event)
    # unwaited: only the last release of each weight slot (2) and scratch pair (2), and the last
    # store of each of the block's 2 layers x 2 batches caches (4)
    assert len(set(marks) - set(waited)) <= 2 + 2 + 4
    # the loads that wait run on the I/O threads (overlap on), the releases on the compute thread
    assert {name for kind, _, name in order.log if kind == "mark"} == {"MainThread"}
    assert any(name.startswith("flexgen-io") for kind, event, name in order.log if kind == "wait" and event)
