"""How long a rank waits for a peer: derived from the plan's predicted task time, never below
--comm-timeout, the process group's own timeout above it; and what a failed wait says."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flexgen_dist.errors import first_line
from flexgen_dist.parallel import comm as comm_module
from flexgen_dist.parallel.comm import (
    ACTIVATIONS,
    TOKENS,
    CommWait,
    PeerError,
    PipeComm,
    process_group_timeout,
    wait_for_tasks,
)
from flexgen_dist.parallel.context import DistContext
from flexgen_dist.parallel.group import Pipeline


def test_the_wait_grows_with_the_predicted_task_and_the_ranks_and_never_goes_below_the_floor():
    floor = 300.0
    tasks = [0.0, 0.01, 1.0, 10.0, 60.0, 600.0, 3600.0]
    for ranks in (2, 3, 8):
        waits = [wait_for_tasks(task_s, ranks, floor).seconds for task_s in tasks]
        assert all(w >= floor for w in waits), waits
        assert waits == sorted(waits) and waits[-1] > waits[-2] > waits[-3] > floor, waits
    # a 10-minute prefill (a large prompt read from disk) on 4 ranks: far past the old fixed 300 s
    assert wait_for_tasks(600.0, 4, floor).seconds >= 4 * 600.0
    assert wait_for_tasks(600.0, 8, floor).seconds > wait_for_tasks(600.0, 4, floor).seconds
    # a tiny model: the floor (the user's --comm-timeout) rules, and the error says so
    small = wait_for_tasks(0.01, 2, 3.0)
    assert small.seconds == 3.0 and "--comm-timeout" in small.source
    big = wait_for_tasks(600.0, 4, floor)
    assert "plan" in big.source and "600" in big.source and "4 ranks" in big.source


@pytest.mark.parametrize("bad", [(-1.0, 2, 300.0), (float("nan"), 2, 300.0), (1.0, 0, 300.0), (1.0, 2, 0.0)])
def test_the_wait_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        wait_for_tasks(*bad)


class _Work:
    """What isend / irecv return: here it never completes (a peer that hung) or raises."""

    def __init__(self, raises: BaseException | None = None):
        self.raises, self.waited = raises, []

    def wait(self, timeout=None):
        self.waited.append(timeout)
        if self.raises is not None:
            raise self.raises
        return False

    def is_completed(self):
        return True


@pytest.fixture
def fake_dist(monkeypatch):
    """PipeComm over fake process groups: what it posts, and the process-group timeouts it sets."""
    seen = SimpleNamespace(work=_Work(), pg_timeouts=[])
    monkeypatch.setattr(comm_module.dist, "new_group", lambda ranks, timeout=None: "ring")
    monkeypatch.setattr(comm_module.dist, "irecv", lambda tensor, src, group=None, tag=0: seen.work)
    monkeypatch.setattr(comm_module.dist, "isend", lambda tensor, dst, group=None, tag=0: seen.work)
    monkeypatch.setattr(comm_module, "_set_group_timeout",
                        lambda seconds, group: seen.pg_timeouts.append((group, seconds)))
    return seen


def test_a_wait_that_times_out_names_the_operation_the_peer_and_where_the_wait_came_from(fake_dist):
    comm = PipeComm(0, 2, "gloo", torch.device("cpu"), CommWait.floor(42.0))
    with pytest.raises(PeerError) as info:
        comm.recv((4,), torch.long, src=1, tag=TOKENS).result()
    message = str(info.value)
    assert "\n" not in message
    assert "receiving token ids from rank 1" in message and "42 s" in message and "--comm-timeout" in message
    assert fake_dist.work.waited[0].total_seconds() == 42.0

    # after the plan: the wait it derived, and the reason, are what the error names
    comm.set_wait(wait_for_tasks(100.0, 2, 42.0))
    fake_dist.work = _Work(raises=RuntimeError("Connection closed by peer [10.0.0.2]:1234\nmore detail"))
    with pytest.raises(PeerError) as info:
        comm.send(torch.zeros(2, 3), dst=1, tag=ACTIVATIONS).wait()
    message = str(info.value)
    wait = wait_for_tasks(100.0, 2, 42.0)
    assert "\n" not in message and "more detail" not in message
    assert "sending hidden states to rank 1" in message and f"{wait.seconds:g} s" in message
    assert "plan" in message and "Connection closed by peer" in message


def test_the_process_groups_outlast_the_wait_the_plan_set(fake_dist):
    comm = PipeComm(0, 2, "nccl", torch.device("cpu"), CommWait.floor(30.0))
    wait = wait_for_tasks(500.0, 2, 30.0)
    comm.set_wait(wait)
    assert comm.wait == wait
    assert {group for group, _ in fake_dist.pg_timeouts} == {None, "ring"}  # the default group and the token ring
    above = process_group_timeout(wait.seconds, "nccl")
    assert above > wait.seconds and all(seconds == above for _, seconds in fake_dist.pg_timeouts)


def test_a_pipeline_takes_its_wait_from_the_plans_longest_task(fake_dist, monkeypatch):
    monkeypatch.setattr(DistContext, "init_process_group", lambda self, timeout_s: None)
    ctx = DistContext(rank=0, world_size=3, local_rank=0, master_addr="127.0.0.1", master_port=29500,
                      backend="gloo", device="cpu", launcher="torchrun")
    pipeline = Pipeline.start(ctx, timeout_s=300)
    assert pipeline.comm.wait == CommWait.floor(300)
    pipeline.expect_tasks(900.0)
    assert pipeline.comm.wait == wait_for_tasks(900.0, 3, 300) and pipeline.comm.wait.seconds > 300


@pytest.mark.parametrize("exc", [RuntimeError(""), RuntimeError("\n"), TimeoutError()])
def test_an_empty_error_message_still_gives_one_line(fake_dist, monkeypatch, exc):
    assert first_line(exc) == type(exc).__name__
    fake_dist.work = _Work(raises=exc)
    comm = PipeComm(1, 2, "gloo", torch.device("cpu"), CommWait.floor(5.0))
    with pytest.raises(PeerError, match=r"receiving hidden states from rank 0 failed .*\(" + type(exc).__name__):
        comm.recv((2,), torch.float32, src=0, tag=ACTIVATIONS).result()

    def failing(*args, **kwargs):  # a peer whose connection fails as the operation is posted
        raise exc

    monkeypatch.setattr(comm_module.dist, "irecv", failing)
    with pytest.raises(PeerError, match="receiving hidden states from rank 0 failed"):
        comm.recv((2,), torch.float32, src=0, tag=ACTIVATIONS)


def test_the_plans_longest_task_is_the_longest_of_any_rank():
    from planner_cases import gpu_machine, opt_spec, place, policy

    from flexgen_dist.planning.cost_model import estimate_pipeline, task_time
    from flexgen_dist.spec.layout import model_units
    from flexgen_dist.planning.placement import Buffers

    spec, hw = opt_spec(layers=6), gpu_machine()
    pol = policy((0, 100, 100, 0, 100, 0), gbs=4, num_batches=2)
    units = model_units(spec)
    cuts = [[units[0], *units[1:2]], [*units[2:-1], units[-1]]]  # rank 1 holds five layers of six
    stages = [place(spec, pol, hw, units=u, buffers=Buffers(separate_gpu=True, num_ranks=2)) for u in cuts]
    est = estimate_pipeline(stages, hw)
    every = [task_time(stage, hw, t) for stage in stages for t in range(stages[0].workload.gen_len)]
    assert est.longest_task_s == max(max(t.seconds, t.send_s) for t in every)
    assert est.longest_task_s > max(t.seconds for t in every[: len(every) // 2])  # the busier rank's, not rank 0's
