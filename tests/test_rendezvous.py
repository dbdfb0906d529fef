"""A rendezvous that does not complete ends every rank with one line and exit code 1: the ranks
that did not join, rank 0's address, what to check. Real processes over loopback, each run
through the CLI's error handling (`run_command`), the way `python -m flexgen_dist.run` runs."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from flexgen_dist.parallel.hostlist import free_port
from rank_processes import RankProcess

pytestmark = pytest.mark.dist

REPO_ROOT = Path(__file__).resolve().parents[1]
JOINING = "joining process group"  # logged by each rank just before it looks for rank 0

RANK_SCRIPT = textwrap.dedent(
    """
    import sys
    from flexgen_dist.cli.shell import exit_process, run_command
    from flexgen_dist.parallel.context import DistContext, setup_logging

    ctx = DistContext.from_env(cuda_device_count=0)
    setup_logging(ctx, verbose=True)

    def body():
        ctx.init_process_group(float(sys.argv[2]) if len(sys.argv) > 2 else 60, rendezvous_timeout_s=float(sys.argv[1]))
        ctx.destroy()
        return 0

    exit_process(run_command(body, rank_of=lambda: ctx.rank))  # as the commands end
    """
)


def start_rank(rank: int, world_size: int, port: int, rendezvous_timeout_s: float, addr="127.0.0.1",
               argv: list[str] | None = None, comm_timeout_s: float = 60) -> RankProcess:
    """A rank running RANK_SCRIPT, or `python argv...` (the CLI) when argv is given."""
    env = {
        name: value for name, value in os.environ.items()
        if not name.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "TORCHELASTIC_"))
    }
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
               MASTER_ADDR=addr, MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return RankProcess([sys.executable, *(argv or ["-c", RANK_SCRIPT, str(rendezvous_timeout_s), str(comm_timeout_s)])],
                       env)


class OtherService:
    """An unrelated TCP service on a free loopback port: accepts every connection, then stays
    silent (reply None) or answers whatever it receives with `reply`. `greeted` is set once a
    client sent bytes: c10d's greeting, past the rendezvous's plain connect probe, which sends none."""

    def __init__(self, reply: bytes | None = None):
        self.reply = reply
        self.greeted = threading.Event()
        self._closed = threading.Event()
        self._connections: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._connections.append(connection)
            threading.Thread(target=self._talk, args=(connection,), daemon=True).start()

    def _talk(self, connection: socket.socket) -> None:
        try:
            while connection.recv(4096):
                self.greeted.set()
                if self.reply is not None:
                    connection.sendall(self.reply)
        except OSError:
            pass

    def __enter__(self) -> "OtherService":
        return self

    def __exit__(self, *exc) -> None:
        self._closed.set()
        self._listener.close()
        for connection in self._connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)  # wakes its reader
            except OSError:
                pass
            connection.close()


def the_error(stderr: str) -> str:
    """The one error line; fails on a traceback or on c10d's own multi-line log output."""
    assert "Traceback" not in stderr and "frame #" not in stderr, stderr[-3000:]
    assert not re.search(r"^\[[WE]\d", stderr, re.MULTILINE), stderr[-3000:]  # c10d's C++ log lines
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def finish_all(ranks: list[RankProcess], timeout_s: float) -> list[tuple[int, str]]:
    try:
        return [rank.finish(timeout_s) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()


def test_a_rank_that_never_joins_is_named_by_every_rank_that_did():
    port = free_port()
    # Rank 1 starts first and retries connecting until rank 0 listens; rank 0 gives up after 10 s.
    # Rank 2 of 3 never starts.
    rank1 = start_rank(1, 3, port, rendezvous_timeout_s=300)
    rank1.wait_for_line(JOINING, timeout_s=300)
    rank0 = start_rank(0, 3, port, rendezvous_timeout_s=10)
    results = finish_all([rank0, rank1], timeout_s=300)
    for rank, (code, stderr) in enumerate(results):
        line = the_error(stderr)
        assert code == 1, stderr[-3000:]
        assert f"rank {rank}: the rendezvous at 127.0.0.1:{port} did not complete within 10 s" in line
        assert "rank 2 did not join (2 of 3 joined)" in line


# Rank 0's store, which checks rank 0 in, waits until rank 1 has checked in and begun connecting
# the process group (gloo's keys appear beside the two of the roll call), then stops: a frozen
# rank 0 (SIGSTOP, a stalled node) in the middle of the rendezvous.
FROZEN_RANK_0 = textwrap.dedent(
    """
    import os, signal, sys, time
    from datetime import timedelta
    import torch.distributed as dist
    from flexgen_dist.parallel.rendezvous import ROLL_CALL_PREFIX

    store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), None, True, timedelta(seconds=300), wait_for_workers=False)
    store.add(f"{ROLL_CALL_PREFIX}/0", 1)
    store.wait([f"{ROLL_CALL_PREFIX}/1"])
    while store.num_keys() <= 2:  # the event itself: rank 1's first key of the process group
        time.sleep(0.01)
    print("stopping", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    """
)


def test_a_rank_0_that_stops_mid_rendezvous_ends_the_others_within_comm_timeout():
    """gloo connects the process group in C++, deaf to signals and without an end while rank 0's
    store is stopped: rank 1 waited forever. Now --comm-timeout bounds it, in one line."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    frozen = RankProcess([sys.executable, "-c", FROZEN_RANK_0, str(port)], env)
    try:
        rank1 = start_rank(1, 2, port, rendezvous_timeout_s=300, comm_timeout_s=3)
        frozen.wait_for_line("stopping", timeout_s=300)
        [(code, stderr)] = finish_all([rank1], timeout_s=300)  # a bound for a hung test, not a measurement
    finally:
        frozen.kill()
    assert code == 1, stderr[-3000:]
    line = the_error(stderr)
    assert f"rank 1: all 2 ranks met at 127.0.0.1:{port} but connecting the gloo process group did not finish " \
           f"in 3 s (--comm-timeout)" in line, line


def test_two_processes_given_one_rank_are_reported():
    port = free_port()
    first, second = (start_rank(1, 3, port, rendezvous_timeout_s=300) for _ in range(2))
    for rank in (first, second):
        rank.wait_for_line(JOINING, timeout_s=300)
    rank0 = start_rank(0, 3, port, rendezvous_timeout_s=10)
    (code0, err0), *twins = finish_all([rank0, first, second], timeout_s=300)
    assert code0 == 1 and "rank 2 did not join (2 of 3 joined; rank 1 joined twice)" in the_error(err0)
    lines = sorted(the_error(stderr) for _, stderr in twins)
    assert [code for code, _ in twins] == [1, 1]
    assert sum(f"another process already joined 127.0.0.1:{port} as rank 1" in line for line in lines) == 1
    assert sum("rank 2 did not join" in line for line in lines) == 1


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ("127.0.0.1", "nothing answered at 127.0.0.1:{port} within 2 s"),
        ("no-such-host.invalid", "cannot resolve rank 0's host 'no-such-host.invalid'"),
    ],
    ids=["nobody-listens", "unknown-host"],
)
def test_rank0_out_of_reach(addr, message):
    port = free_port()  # nothing listens there
    [(code, stderr)] = finish_all([start_rank(1, 2, port, rendezvous_timeout_s=2, addr=addr)], timeout_s=300)
    assert code == 1, stderr[-3000:]
    assert message.format(port=port) in the_error(stderr)


def test_torchrun_ranks_meet_at_its_agent_store(tmp_path):
    # torchrun's agent already serves a store at MASTER_PORT: rank 0 must join it, not listen.
    script = tmp_path / "rank.py"
    # each rank that joined leaves a file: the ranks share one stdout pipe, unbuffered, where even one
    # print's pieces interleave ("joinedjoined  01")
    script.write_text(RANK_SCRIPT.replace(
        "ctx.destroy()", "open(f'{sys.argv[3]}/joined-{ctx.rank}', 'x').close()\n    ctx.destroy()"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "60", "60", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(path.name for path in tmp_path.glob("joined-*")) == ["joined-0", "joined-1"], proc.stderr[-3000:]
    assert not re.search(r"^\[[WE]\d", proc.stderr, re.MULTILINE), proc.stderr[-3000:]  # no c10d complaint
    assert "launcher torchrun" in proc.stderr


def test_rank0_port_in_use():
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        [(code, stderr)] = finish_all([start_rank(0, 2, port, rendezvous_timeout_s=300)], timeout_s=300)
    assert code == 1, stderr[-3000:]
    line = the_error(stderr)
    assert f"rank 0: cannot listen on port {port}" in line and "EADDRINUSE" in line and "MASTER_PORT" in line


@pytest.mark.parametrize("reply", [None, b"HTTP/1.0 400 Bad Request\r\n\r\n"], ids=["silent", "garbage"])
def test_another_service_at_master_port_ends_the_rank(reply):
    # c10d's client waited for the service's answer in C++ without a timeout: forever when silent.
    with OtherService(reply) as service:
        [(code, stderr)] = finish_all([start_rank(1, 2, service.port, rendezvous_timeout_s=2)], timeout_s=300)
        assert service.greeted.is_set()  # the rank got past the plain connect, to the store's greeting
    assert code == 1, stderr[-3000:]
    line = the_error(stderr)
    assert f"rank 1: 127.0.0.1:{service.port} " in line and "check MASTER_ADDR / MASTER_PORT" in line
    if reply is None:
        # at most the 2 s rendezvous deadline, less what the rank spent before the greeting (under load, 1.99)
        assert re.search(r"accepted the connection but no rendezvous store answered in (2|1\.\d+) s: it is not "
                         r"rank 0's store", line), line


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_a_rank_waiting_for_another_service(signum):
    # The CLI itself: its signal handling, and --comm-timeout long enough that only the signal ends the wait.
    with OtherService() as service:
        rank1 = start_rank(1, 2, service.port, rendezvous_timeout_s=600,
                           argv=["-m", "flexgen_dist.run", "--comm-timeout", "600"])
        try:
            while not service.greeted.wait(timeout=0.1):  # the rank is in the wait once it greeted
                assert rank1.proc.poll() is None, rank1.stderr[-3000:]
            rank1.proc.send_signal(signum)
            code, stderr = rank1.finish(timeout_s=60)  # a safety net: it ends at once
        finally:
            rank1.kill()
    assert code == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]


class LateGarbageService(OtherService):
    """Answers a greeting with garbage `delay_s` after it came: after the rank gave up waiting, while
    its process ends (c10d's thread then returns into an interpreter that is finalizing)."""

    def __init__(self, delay_s: float):
        super().__init__(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        self.delay_s = delay_s

    def _talk(self, connection: socket.socket) -> None:
        try:
            if connection.recv(4096):
                self.greeted.set()
                threading.Event().wait(self.delay_s)  # the behaviour under test: a slow wrong answer
                connection.sendall(self.reply)
                while connection.recv(4096):
                    connection.sendall(self.reply)
        except OSError:
            pass


@pytest.mark.parametrize("delay_s", [1.1, 1.3, 1.6])
def test_a_wrong_answer_after_giving_up_does_not_abort_the_process(delay_s):
    """The rank gives up after --comm-timeout 1 and prints its line; c10d's connect thread, left
    in C++, got the garbage later and returned while the interpreter finalized: CPython unwound
    its C++ frames and the process aborted (exit -6, 'terminate called without an active
    exception') after the line. A process with such a thread now ends without finalizing."""
    with LateGarbageService(delay_s) as service:
        rank1 = start_rank(1, 2, service.port, rendezvous_timeout_s=600,
                           argv=["-m", "flexgen_dist.run", "--comm-timeout", "1"])
        try:
            code, stderr = rank1.finish(timeout_s=120)
        finally:
            rank1.kill()
    assert code == 1, stderr[-3000:]
    assert "terminate called" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert "check MASTER_ADDR / MASTER_PORT" in the_error(stderr)


def test_exit_process_skips_finalizing_only_after_a_thread_was_left_in_c10d(tmp_path):
    script = ("import atexit, sys\n"
              "from flexgen_dist.cli.shell import exit_process\n"
              "from flexgen_dist.parallel import rendezvous\n"
              "atexit.register(lambda: print('finalized', flush=True))\n"
              "if sys.argv[1] == 'left': rendezvous.LEFT_BEHIND.set()\n"
              "print('line', flush=True)\n"
              "exit_process(3)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    for mode, finalized in (("left", False), ("none", True)):
        proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 3 and proc.stdout.startswith("line")
        assert ("finalized" in proc.stdout) == finalized, (mode, proc.stdout)
