"""Where loads run: a small thread pool (overlap on) or inline (overlap off).

With overlap, the next layer's weights and the next batch's KV cache are loaded on pool threads
while the current batch computes. On a GPU each pool thread copies on its own CUDA stream, so
host-to-device transfers run beside the compute stream; a load's result is handed over only
once its stream has finished, so compute never reads a half-copied buffer. Both modes give
identical tokens.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class Ready:
    """An already available value with a Future's `result()`."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


class Loader:
    def __init__(self, *, workers: int, device: torch.device, overlap: bool):
        self.device = device
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="flexgen-io") if overlap else None
        self._streams = threading.local()

    def submit(self, fn, *args) -> Future | Ready:
        if self._pool is None:
            return Ready(fn(*args))
        if self.device.type == "cuda":
            return self._pool.submit(self._on_load_stream, fn, *args)
        return self._pool.submit(fn, *args)

    def _on_load_stream(self, fn, *args):
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            out = fn(*args)
        stream.synchronize()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
