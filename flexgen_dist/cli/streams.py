"""Standard output as the commands use it, made safe against how it can fail.

- Closed (`>&-`): file descriptor 1 is opened on /dev/null before anything else opens a file,
  so no file of ours (an output, a weight) can become descriptor 1 and receive printed lines,
  and no C library writes there. A run whose results would go to standard output (`--output -`,
  printed continuations) is then refused before the model loads (`closed_at_start`); a run that
  writes its results to a file runs, its information lines go nowhere.
- A broken pipe (`| head -1`): the reader is gone. Like a Unix tool killed by SIGPIPE the
  command ends at once, without a message, with exit code 141 (128 + SIGPIPE); what a job saved
  in its progress file stays there, and the same command resumes it.
- A write that fails otherwise (`> /dev/full`, an I/O error): one line, exit code 1.
- An encoding that cannot show a character (PYTHONIOENCODING=ascii): the character is written
  as a backslash escape instead of ending the run (JSON lines are escaped by their writer).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, TextIO

from ..errors import EnvironmentFailure

SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a tool the signal ended


class OutputClosed(Exception):
    """Standard output's reader went away (EPIPE); not an OSError, so no handler of file errors
    takes it for a full disk."""


class StdoutFailure(EnvironmentFailure):
    """A write to standard output failed (a full disk behind `>`, an I/O error)."""


class GuardedStdout:
    """A text stream over the real standard output that raises OutputClosed on a broken pipe,
    StdoutFailure (one line, exit 1) on any other write error, and escapes what its encoding cannot
    write."""

    def __init__(self, inner: TextIO, *, closed_at_start: bool = False) -> None:
        self._inner = inner
        self.closed_at_start = closed_at_start

    def write(self, text: str) -> int:
        try:
            return self._inner.write(text)
        except UnicodeEncodeError:
            encoding = getattr(self._inner, "encoding", None) or "ascii"
            escaped = text.encode(encoding, "backslashreplace").decode(encoding)
            return self._guarded(self._inner.write, escaped)
        except OSError as exc:
            raise _failure(exc) from None

    def flush(self) -> None:
        self._guarded(self._inner.flush)

    def _guarded(self, call, *args):
        try:
            return call(*args)
        except OSError as exc:
            raise _failure(exc) from None

    def __getattr__(self, name: str):  # encoding, fileno, isatty, buffer, ...
        return getattr(self._inner, name)


def _failure(exc: OSError) -> Exception:
    if isinstance(exc, BrokenPipeError):
        return OutputClosed()
    return StdoutFailure(f"cannot write to standard output: {exc.strerror or exc}")


def can_encode(stream: TextIO, text: str) -> bool:
    """Whether `text` can be written to `stream` as it is (its encoding holds every character)."""
    try:
        text.encode(getattr(stream, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def stdout_closed_at_start() -> bool:
    return bool(getattr(sys.stdout, "closed_at_start", False))


@contextmanager
def guarded_stdout() -> Iterator[GuardedStdout]:
    """sys.stdout guarded while a command runs (see the module's docstring); at the end it is
    flushed, so a late write error is caught here too and not by the interpreter at exit."""
    closed = _reopen_closed_stdout()
    original = sys.stdout
    guarded = GuardedStdout(original, closed_at_start=closed)
    sys.stdout = guarded
    try:
        yield guarded
        guarded.flush()
    except (OutputClosed, StdoutFailure):
        silence_stdout(original)
        raise
    finally:
        sys.stdout = original


def _reopen_closed_stdout() -> bool:
    """True if standard output was closed when the process started (Python then sets
    sys.stdout to None); sys.stdout becomes /dev/null, and so does descriptor 1 if it is still
    closed (run.py does this before its imports: `hold_standard_descriptors`)."""
    if sys.stdout is not None:
        return False
    hold_standard_descriptors()
    sys.stdout = open(os.devnull, "w")
    return True


def hold_standard_descriptors() -> None:
    """Open /dev/null on descriptors 0, 1 and 2 where they are closed, before any other file is
    opened: a file opened later would otherwise take the lowest free number and receive what
    is printed (or read) there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def silence_stdout(stream: TextIO | None) -> None:
    """After a broken or failing standard output: its descriptor 1 goes to /dev/null, so what is
    still buffered is dropped there and the interpreter's last flush does not fail again. A
    stream that is not descriptor 1 (a test's capture) is left alone."""
    try:
        if stream is None or stream.fileno() != 1:
            return
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass
