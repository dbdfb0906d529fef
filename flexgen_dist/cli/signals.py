"""SIGINT and SIGTERM during a job: stop at once, but never in the middle of saving results.

Inside `with StopSignals() as signals:` either signal raises `Interrupted` in the main thread
where it is, so the engine's `finally` blocks free the block states and remove their scratch
files, and what is finished is already on disk (results are appended as each block closes).
Inside `with signals.deferred():` (an append in progress) the signal waits for the end of the
block. A second signal while the first is being handled is ignored, so the clean-up completes.
The command then exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).

A command's imports take seconds (torch) before `StopSignals` can be entered. `HeldSignals.install()`
as the first statement of a command's module holds a signal arriving then; the first `StopSignals`
entered raises it, so an early Ctrl-C or SIGTERM also ends in one line and 130 / 143.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

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
