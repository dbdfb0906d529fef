"""Joining the process group: rank 0's TCP store, a roll call of the ranks, then torch.distributed.

torch's own `tcp://` rendezvous reports a peer that never came as a bare `DistStoreError`
("Timed out after 8 seconds waiting for clients. 1/2 clients joined") after screens of c10d log
lines, and a rank that cannot reach rank 0 retries with more of them. Here each rank checks in
under its own key in rank 0's store and waits for all the others, so a rendezvous that does not
complete ends on every rank with one line naming the ranks that did not join, the address, and
what to check: a `RendezvousError`, which the CLI turns into exit code 1 like any dead peer.

The steps, all under one deadline:
1. Rank 0 listens (a `TCPStore` server). A port in use fails at once. Under torchrun, whose
   agent already serves a store at MASTER_PORT, every rank is that store's client instead.
2. The other ranks connect, retrying while rank 0 does not listen yet. The retries are plain
   Python sockets: c10d's own client retries print C++ stack traces on every attempt. Once
   something accepts, c10d's client greets it (a ping) and waits for the answer in C++ with no
   timeout: an unrelated service at MASTER_PORT that never answers would hold the rank forever,
   deaf to SIGTERM. So the greeting runs in a helper thread while this one waits at most
   --comm-timeout (within the deadline), a slice at a time, so a signal's handler runs.
3. Roll call: rank r adds 1 to its key (a second process given the same rank reads 2 and stops),
   then every rank waits until all ranks' keys exist, asking the store again after a growing pause.
   When rank 0's deadline passes first it writes its verdict into the store and waits (briefly)
   until the ranks that joined have read it, so they all report the missing ranks, not "rank 0
   went away".
4. `dist.init_process_group(store=...)`: gloo connects every pair of ranks, all known to be up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from ..errors import PeerError, first_line

logger = logging.getLogger(__name__)

ROLL_CALL_PREFIX = "flexgen_dist/rendezvous/rank"
FAILED_KEY = "flexgen_dist/rendezvous/failed"  # rank 0's one-line verdict when it gives up
FAILED_SEEN_KEY = "flexgen_dist/rendezvous/failed_seen"  # how many ranks have read it
# Pause between two questions to the store while waiting: short at first (ranks usually arrive
# together), capped so a late rank is seen within a second.
_FIRST_PAUSE_S = 0.01
_MAX_PAUSE_S = 1.0
_LISTED_RANKS = 8  # a message names at most this many missing ranks
# While the main thread waits for the store's greeting, it wakes this often to run a signal's handler
# (a signal delivered to another thread interrupts no wait of the main thread).
_SIGNAL_SLICE_S = 0.1
# How long rank 0 keeps its store up after giving up, for the ranks that joined to read why (they
# ask at least every _MAX_PAUSE_S); once it exits they could only say that rank 0 went away.
_VERDICT_GRACE_S = 5.0


class RendezvousError(PeerError):
    """The ranks did not all meet: a rank never joined, rank 0 was unreachable, or its port was taken."""


def join_process_group(
    *,
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    backend: str,
    timeout_s: float,
    rendezvous_timeout_s: float,
    store_served_by_launcher: bool = False,
) -> None:
    """Meet the other ranks at rank 0's store, then initialise torch.distributed's default group.

    timeout_s: the process group's timeout for every later collective and point-to-point wait, and
        the longest wait for rank 0's store to answer once something accepted the connection.
    rendezvous_timeout_s: how long to wait for all ranks to arrive, measured from this call.
    store_served_by_launcher: the launcher serves the store at master_addr:master_port (torchrun's
        agent does, a fresh one per attempt), so rank 0 joins it as a client instead of listening.
    Raises `RendezvousError` (one line) when the ranks do not all meet in time.
    """
    where = _where(master_addr, master_port)
    deadline = time.monotonic() + rendezvous_timeout_s
    store = _open_store(
        rank, master_addr, master_port, where, timeout_s, rendezvous_timeout_s, deadline, store_served_by_launcher
    )
    _roll_call(store, rank, world_size, where, rendezvous_timeout_s, deadline)
    # gloo connects every pair in C++, deaf to signals, and waits on for a rank that stopped
    # (SIGSTOP, a frozen node) after the roll call: in a thread, bounded by --comm-timeout. c10d
    # logs a C++ warning each time its own wait (the group's timeout) passes: that is made longer
    # than ours while connecting, so a rank that gives up is gone before c10d speaks, then set.
    failed = f"rank {rank}: all {world_size} ranks met at {where} but connecting the {backend} process group"
    try:
        with _c10d_logs_quieted():
            _in_thread(lambda: dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                                       timeout=timedelta(seconds=2 * timeout_s + 60)),
                       give_up=time.monotonic() + timeout_s, name="rendezvous-process-group")
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timedelta(seconds=timeout_s), None)
    except TimeoutError:
        raise RendezvousError(f"{failed} did not finish in {timeout_s:g} s (--comm-timeout): a rank stopped or "
                              f"hung while connecting") from None
    except Exception as exc:  # gloo raises when a rank dies between the roll call and connecting
        raise RendezvousError(f"{failed} failed ({first_line(exc)}); a rank died while connecting") from None


def _open_store(rank: int, addr: str, port: int, where: str, timeout_s: float, rendezvous_timeout_s: float,
                deadline: float, store_served_by_launcher: bool):
    store_timeout = timedelta(seconds=rendezvous_timeout_s)
    if rank == 0 and not store_served_by_launcher:
        try:
            return dist.TCPStore(addr, port, None, True, store_timeout, wait_for_workers=False)
        except dist.DistError as exc:
            raise RendezvousError(
                f"rank 0: cannot listen on port {port} for the rendezvous ({first_line(exc)}); another job or "
                "a second rank 0 holds it: set MASTER_PORT to a free port"
            ) from None
    _wait_until_listening(rank, addr, port, where, rendezvous_timeout_s, deadline)
    # A store answers its greeting at once (its server thread listens before anything can connect);
    # waiting for it is waiting for a peer, so --comm-timeout bounds it, as does the deadline.
    answer_s = max(0.1, min(timeout_s, deadline - time.monotonic()))
    store = _connect_client(rank, addr, port, where, answer_s)
    store.set_timeout(store_timeout)  # a later `get` waits for keys as long as the rendezvous does
    return store


# Set when a connect thread was left inside c10d's C++ constructor: if it comes out while the
# interpreter finalizes (c10d gave up retrying), CPython stops it by unwinding C++ frames that
# cannot unwind, and the process aborts ("terminate called without an active exception", exit -6)
# after the one-line error. The command's process then ends without finalizing (cli/shell.py).
LEFT_BEHIND = threading.Event()


def _connect_client(rank: int, addr: str, port: int, where: str, answer_s: float):
    """c10d's client store at addr:port, once it answered; `RendezvousError` when it does not
    answer as a store within answer_s seconds.

    c10d's constructor greets the server and waits for its answer in C++ without a timeout, and
    retries in C++ sleeps: neither ends for a signal. It runs in a daemon thread that is left
    behind when it does not finish (blocked on a socket, it holds nothing the exit needs); this
    thread waits in slices, so SIGINT / SIGTERM raise here as anywhere. c10d retries a wrong
    answer (garbage) until its own timeout, half of ours, so that its reason usually arrives
    before we give up; it logs each retry on stderr: quieted while it runs, the error says what
    went wrong."""
    try:
        with _c10d_logs_quieted():
            return _in_thread(lambda: dist.TCPStore(addr, port, None, False, timedelta(seconds=answer_s / 2)),
                              give_up=time.monotonic() + answer_s, name=f"rendezvous-connect-{where}")
    except TimeoutError:
        raise RendezvousError(
            f"rank {rank}: {where} accepted the connection but no rendezvous store answered in {answer_s:.3g} s: "
            f"it is not rank 0's store (check MASTER_ADDR / MASTER_PORT), or rank 0 is stopped"
        ) from None
    except Exception as exc:
        raise RendezvousError(
            f"rank {rank}: {where} answered but is not rank 0's rendezvous store "
            f"({first_line(exc)}): check MASTER_ADDR / MASTER_PORT"
        ) from None


def _in_thread(call, *, give_up: float, name: str):
    """`call()` in a daemon thread, its result or its exception here; `TimeoutError` once the
    monotonic clock passes `give_up`, leaving the thread behind (LEFT_BEHIND). This thread waits in
    slices, so SIGINT / SIGTERM raise here while c10d's C++ waits there."""
    outcome: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # raised by the waiting thread
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    while not done.wait(max(0.0, min(_SIGNAL_SLICE_S, give_up - time.monotonic()))):
        if time.monotonic() >= give_up:
            LEFT_BEHIND.set()
            raise TimeoutError(name)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@contextlib.contextmanager
def _c10d_logs_quieted():
    """Standard error (descriptor 2) on /dev/null: c10d's C++ log lines have no switch in Python.
    When a thread was left inside c10d meanwhile (LEFT_BEHIND), it may still log (a retry, a C++
    stack trace) after the one-line error: descriptor 2 then stays on /dev/null and Python's
    standard error moves to the real one (`_python_stderr_to`)."""
    try:
        sys_err = os.dup(2)
    except OSError:  # descriptor 2 closed: nothing to quiet
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        if LEFT_BEHIND.is_set():
            _python_stderr_to(sys_err)
        else:
            os.dup2(sys_err, 2)
            os.close(sys_err)


def _python_stderr_to(fd: int) -> None:
    """sys.stderr, and every logging handler that wrote to it, onto descriptor `fd` (which it owns)."""
    old = sys.stderr
    new = os.fdopen(fd, "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                    errors=getattr(old, "errors", None) or "backslashreplace")
    sys.stderr = new
    loggers = [logging.getLogger(), *logging.root.manager.loggerDict.values()]  # placeholders have no handlers
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(new)


def _wait_until_listening(rank: int, addr: str, port: int, where: str, rendezvous_timeout_s: float, deadline: float):
    """Return once something accepts TCP connections at addr:port; rank 0 may start later than us."""
    pause = _FIRST_PAUSE_S
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(remaining, 5.0))):
                return
        except socket.gaierror as exc:
            raise RendezvousError(
                f"rank {rank}: cannot resolve rank 0's host {addr!r} ({exc.strerror}): set MASTER_ADDR to a name "
                "or address of rank 0's node"
            ) from None
        except OSError as exc:
            last_error = exc.strerror or str(exc) or type(exc).__name__
        if time.monotonic() + pause >= deadline:
            raise RendezvousError(
                f"rank {rank}: nothing answered at {where} within {rendezvous_timeout_s:g} s ({last_error}): rank 0 "
                "did not start or died, or MASTER_ADDR / MASTER_PORT point elsewhere"
            )
        time.sleep(pause)
        pause = min(2 * pause, _MAX_PAUSE_S)


def _roll_call(store, rank: int, world_size: int, where: str, rendezvous_timeout_s: float, deadline: float) -> None:
    keys = [f"{ROLL_CALL_PREFIX}/{other}" for other in range(world_size)]
    try:
        if store.add(keys[rank], 1) > 1:
            raise RendezvousError(
                f"rank {rank}: another process already joined {where} as rank {rank}: the launcher gave two "
                "processes one rank; start all ranks with one launcher (see DistContext.from_env)"
            )
        pause = _FIRST_PAUSE_S
        while not store.check(keys):
            if rank != 0 and store.check([FAILED_KEY]):
                # Rank 0 gave up: report its verdict, not the lost store once it has exited.
                verdict = store.get(FAILED_KEY).decode()
                store.add(FAILED_SEEN_KEY, 1)
                raise RendezvousError(f"rank {rank}: {verdict}")
            if time.monotonic() + pause >= deadline:
                verdict = _verdict(store, keys, where, rendezvous_timeout_s)
                if rank == 0:
                    _tell_the_others(store, verdict, keys)
                raise RendezvousError(f"rank {rank}: {verdict}")
            time.sleep(pause)
            pause = min(2 * pause, _MAX_PAUSE_S)
    except dist.DistError as exc:
        raise RendezvousError(
            f"rank {rank}: lost rank 0's rendezvous store at {where} ({first_line(exc)}); rank 0 died"
        ) from None
    logger.debug("rank %d: all %d ranks checked in at %s", rank, world_size, where)


def _verdict(store, keys: list[str], where: str, rendezvous_timeout_s: float) -> str:
    """Which ranks did not join, and which were claimed by two processes (a launcher mix-up)."""
    missing = [other for other, key in enumerate(keys) if not store.check([key])]
    claimed_twice = [other for other, key in enumerate(keys) if other not in missing and store.add(key, 0) > 1]
    twice = f"; {_name_ranks(claimed_twice)} joined twice" if claimed_twice else ""
    return (
        f"the rendezvous at {where} did not complete within {rendezvous_timeout_s:g} s: {_name_ranks(missing)} "
        f"did not join ({len(keys) - len(missing)} of {len(keys)} joined{twice}); check that every rank started, "
        "did not fail before joining, and can reach that address"
    )


def _tell_the_others(store, verdict: str, keys: list[str]) -> None:
    """Rank 0 publishes its verdict and keeps its store up until the ranks that joined have read it."""
    store.set(FAILED_KEY, verdict)
    joined_others = sum(store.check([key]) for key in keys[1:])
    grace_end = time.monotonic() + _VERDICT_GRACE_S
    pause = _FIRST_PAUSE_S
    while store.add(FAILED_SEEN_KEY, 0) < joined_others and time.monotonic() + pause < grace_end:
        time.sleep(pause)
        pause = min(2 * pause, _MAX_PAUSE_S)


def _name_ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    listed = ", ".join(str(rank) for rank in ranks[:_LISTED_RANKS])
    more = f" and {len(ranks) - _LISTED_RANKS} more" if len(ranks) > _LISTED_RANKS else ""
    return f"ranks {listed}{more}"


def _where(addr: str, port: int) -> str:
    host = f"[{addr}]" if ":" in addr else addr  # IPv6
    return f"{host}:{port}"
