"""Chrome / Perfetto traces of the engine's ops (`--trace FILE.json`).

Every op becomes a complete event ("ph": "X") named after what it does (`load weight`,
`load cache`, `compute`, `store cache`, `send activation`, `recv tokens`, ...), on the track of
the thread that ran it, so loads on the I/O threads are seen next to the compute they overlap.
Open the file in chrome://tracing or ui.perfetto.dev.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import ContextManager, Protocol


class Tracing(Protocol):
    """What the engine needs of a tracer: a span around each op, on the thread that runs it."""

    def span(self, name: str, cat: str) -> ContextManager[None]: ...


class Tracer:
    def __init__(self, pid: int = 0):
        self.pid = pid  # the rank
        self._events: list[dict] = []
        self._threads: dict[int, str] = {}
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def span(self, name: str, cat: str, **args):
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            thread = threading.current_thread()
            event = {
                "name": name,
                "cat": cat,
                "ph": "X",
                "ts": (start - self._t0) * 1e6,
                "dur": (end - start) * 1e6,
                "pid": self.pid,
                "tid": thread.ident,
                "args": args,
            }
            with self._lock:
                self._events.append(event)
                self._threads.setdefault(thread.ident, thread.name)

    def reset(self) -> None:
        """Forget what was recorded so far (e.g. an untimed warm-up)."""
        with self._lock:
            self._events.clear()
            self._t0 = time.perf_counter()

    def events(self) -> list[dict]:
        with self._lock:
            meta = [
                {"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid, "args": {"name": name}}
                for tid, name in self._threads.items()
            ]
            meta.append({"name": "process_name", "ph": "M", "pid": self.pid, "args": {"name": f"rank {self.pid}"}})
            return meta + list(self._events)

    def document(self) -> dict:
        """The trace as Chrome's JSON object format (the front end writes it to `--trace`)."""
        return {"traceEvents": self.events(), "displayTimeUnit": "ms"}


class NoTracer:
    """Tracing off: spans cost a function call."""

    @contextlib.contextmanager
    def span(self, name: str, cat: str, **args):
        yield
