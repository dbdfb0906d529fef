"""The process shell every command runs its body in: a user's mistake, a failure of the
environment, a signal each end as one line on stderr and an exit code, never a traceback.

Flags: `OneLineParser`, the argument parser every command uses: a mistake in its flags is one line.

Before torch (`refuse_too_little_memory`): an address-space limit (`ulimit -v`) too small for
torch makes its import abort with a C++ `std::bad_alloc` or a MemoryError traceback; a memory
cgroup too small for it gets the process killed by the kernel without a word. Neither says what is
wrong, so both are refused first, in one line (exit 1: the environment, not the user's flags).

Signals: SIGINT and SIGTERM during a job stop it at once, but never in the middle of saving
results. Inside `with StopSignals() as signals:` either signal raises `Interrupted` in the main
thread where it is, so the engine's `finally` blocks free the block states and remove their
scratch files, and what is finished is already on disk (results are appended as each block
closes). Inside `with signals.deferred():` (an append in progress) the signal waits for the end of
the block. A second signal while the first is being handled is ignored, so the clean-up completes.
The command then exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
A command's imports take seconds (torch) before `StopSignals` can be entered. `HeldSignals.install()`
as the first statement of a command's module holds a signal arriving then; the first `StopSignals`
entered raises it, so an early Ctrl-C or SIGTERM also ends in one line and 130 / 143.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Callable, Iterator

from ..errors import EnvironmentFailure, PeerError, SharedError, UserError
from .streams import SIGPIPE_EXIT, OutputClosed, guarded_stdout


class OneLineParser(argparse.ArgumentParser):
    """argparse with a user's mistake on one line (`error: ... (see --help)`, exit 2) instead of
    the usage block followed by the message."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


MIN_ADDRESS_SPACE = 1 << 30  # torch + transformers import in ~700 MiB of address space on x86-64 Linux
MIN_START_MEMORY = 320 << 20  # their import's resident set is ~250 MiB


def refuse_too_little_memory() -> None:
    """Exit 1 with one line when RLIMIT_AS or the binding memory cgroup leaves too little to start."""
    problem = _address_space_problem() or _cgroup_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)


def _address_space_problem() -> str | None:
    try:
        import resource
    except ImportError:  # not a POSIX system: no such limit
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and soft < MIN_ADDRESS_SPACE:
        return (f"the address-space limit (ulimit -v) is {soft >> 20} MiB, below the {MIN_ADDRESS_SPACE >> 20} MiB "
                f"torch needs to start; raise it (ulimit -v unlimited) or cap memory with a cgroup instead")
    return None


def _cgroup_problem() -> str | None:
    from ..machine.detect import cgroup_memory

    try:
        group = cgroup_memory()
    except OSError:  # an unreadable /proc or /sys: the planner reports what it can later
        return None
    if group is not None and group.headroom < MIN_START_MEMORY:
        return (f"the memory cgroup {group.group} leaves {group.headroom >> 20} MiB (limit {group.limit >> 20} MiB), "
                f"below the {MIN_START_MEMORY >> 20} MiB torch needs to start; raise the limit")
    return None


HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, as KeyboardInterrupt: no `except Exception` in
    the code it goes through catches it and carries on."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.message = message or f"interrupted by {self.name}"
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def with_message(self, message: str) -> "Interrupted":
        return Interrupted(self.signum, message)


class HeldSignals:
    """The handler of SIGINT and SIGTERM while a command starts: remembers the first signal. The
    state lives in the handler the signal module holds, where StopSignals finds it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.replaced: dict[int, object] = {}  # the handlers in place before, restored by StopSignals

    @classmethod
    def install(cls) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        held = cls()
        for signum in HANDLED:
            held.replaced[signum] = signal.signal(signum, held)

    def __call__(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # A second signal: the start is stuck (an import on a hung file system?). Nothing has been
        # written yet, so leave at once rather than wait for StopSignals.
        os.write(2, f"interrupted by {signal.Signals(signum).name} while starting; nothing was done\n".encode())
        os._exit(128 + signum)


class StopSignals:
    def __init__(self) -> None:
        self._previous: dict[int, object] = {}
        self._deferred_depth = 0
        self._pending: int | None = None
        self._raised = False

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            held = None
            for signum in HANDLED:
                previous = signal.signal(signum, self._handle)
                if isinstance(previous, HeldSignals):
                    held, previous = previous, previous.replaced.get(signum, signal.SIG_DFL)
                self._previous[signum] = previous
            if held is not None and held.signum is not None:  # it came while the command started
                self.__exit__()
                raise Interrupted(held.signum, f"interrupted by {signal.Signals(held.signum).name} while "
                                               "starting; nothing was done")
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self._raised or self._pending is not None:
            return  # already stopping: let the clean-up finish
        if self._deferred_depth:
            self._pending = signum
            return
        self._raised = True
        raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A section a signal must not cut (writing results): the signal is raised at its end."""
        self._deferred_depth += 1
        try:
            yield
        finally:
            self._deferred_depth -= 1
        if not self._deferred_depth and self._pending is not None and not self._raised:
            signum, self._raised = self._pending, True
            raise Interrupted(signum)


def exit_process(code: int) -> None:
    """End a command's process with `code`. Where a rendezvous left a thread inside c10d's C++
    (parallel/rendezvous.py LEFT_BEHIND), without finalizing the interpreter: finalizing would
    abort the process when that thread returns, after the one-line error, with exit -6."""
    rendezvous = sys.modules.get("flexgen_dist.parallel.rendezvous")  # not imported: no rendezvous ran
    if rendezvous is not None and rendezvous.LEFT_BEHIND.is_set():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def run_command(main: Callable[[], int], rank_of: Callable[[], int] = lambda: 0) -> int:
    """Run a command's body: a user's mistake becomes one line on stderr and exit code 2 (one
    that every rank raises alike, a `SharedError`, printed by rank 0 only; another by its rank,
    which names itself); a failure of the environment (a dead or hung
    peer, a full disk), one line and exit code 1; SIGINT / SIGTERM (see above), one line
    from rank 0 and 128 + the signal number. Standard output is guarded while it runs
    (streams.py): closed, it is /dev/null; a broken pipe ends the command quietly with 141; a
    failed write is one line and exit 1."""
    try:
        with guarded_stdout():
            return main()
    except OutputClosed:
        return SIGPIPE_EXIT
    except UserError as exc:
        rank = rank_of()
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        elif not isinstance(exc, SharedError):  # this rank's own: the others know only that it left
            print(f"error: rank {rank}: {exc}", file=sys.stderr)
        return 2
    except (PeerError, EnvironmentFailure) as exc:
        logging.getLogger("flexgen_dist").error("%s", exc)
        return 1
    except MemoryError:
        print("error: out of memory (the process's address space or RAM ran out); give it more, or lower "
              "--cpu-mem so the plan offloads more", file=sys.stderr)
        return 1
    except Interrupted as exc:
        if rank_of() == 0:
            print(exc.message, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if rank_of() == 0:
            print("interrupted by SIGINT", file=sys.stderr)
        return 130
