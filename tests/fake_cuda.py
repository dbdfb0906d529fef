"""A recording stand-in for the parts of `torch.cuda` the GPU path calls, for tests on a machine
without a GPU: devices, streams, events, synchronize, cudaHostRegister / cudaHostUnregister.

Every call is appended to `FakeCuda.log` as a tuple, in the order made, so a test can check what
was asked of which device and stream, and in which order. The current device and the current
stream of each device are per thread, as in CUDA."""

from __future__ import annotations

import contextlib
import threading

import torch


class FakeStream:
    def __init__(self, cuda: "FakeCuda", name: str, device_index: int):
        self.cuda, self.name, self.device_index = cuda, name, device_index

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.device_index)

    def wait_event(self, event: "FakeEvent") -> None:
        self.cuda.record("wait_event", self.name, event.name)

    def synchronize(self) -> None:
        self.cuda.record("stream_synchronize", self.name)

    def __repr__(self) -> str:
        return f"FakeStream({self.name!r}, cuda:{self.device_index})"


class FakeEvent:
    def __init__(self, cuda: "FakeCuda"):
        self.cuda = cuda
        self.name = f"event{next(cuda.counter)}"
        self.stream: FakeStream | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        self.stream = stream if stream is not None else self.cuda.current_stream()
        self.cuda.record("event_record", self.name, self.stream.name)

    def synchronize(self) -> None:
        self.cuda.record("event_synchronize", self.name)


class FakeCudart:
    def __init__(self, cuda: "FakeCuda"):
        self.cuda = cuda

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        err = self.cuda.register_errors.pop(0) if self.cuda.register_errors else 0
        self.cuda.record("register", ptr, nbytes, flags, self.cuda.current_device(), err)
        if err == 0:
            self.cuda.registered.add(ptr)
        return err

    def cudaHostUnregister(self, ptr: int) -> int:
        self.cuda.record("unregister", ptr, self.cuda.current_device())
        self.cuda.registered.discard(ptr)
        return 0


class FakeCuda:
    def __init__(self, monkeypatch, device_count: int = 2, bf16: str = "native"):
        """bf16: "native" (compute capability 8+), "emulated" (supported only by emulation), "none"."""
        import itertools

        self.log: list[tuple] = []
        self.registered: set[int] = set()
        self.register_errors: list[int] = []  # results of the next cudaHostRegister calls (0: success)
        self.bf16 = bf16
        self.counter = itertools.count(1)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._default = {i: FakeStream(self, f"default:{i}", i) for i in range(device_count)}
        self._cudart = FakeCudart(self)
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: device_count)
        monkeypatch.setattr(cuda, "current_device", self.current_device)
        monkeypatch.setattr(cuda, "set_device", self.set_device)
        monkeypatch.setattr(cuda, "device", self.device)
        monkeypatch.setattr(cuda, "synchronize", self.synchronize)
        monkeypatch.setattr(cuda, "cudart", lambda: self._cudart)
        monkeypatch.setattr(cuda, "current_stream", self.current_stream)
        monkeypatch.setattr(cuda, "stream", self.stream)
        monkeypatch.setattr(cuda, "Stream", self.new_stream)
        monkeypatch.setattr(cuda, "Event", lambda *a, **k: FakeEvent(self))
        monkeypatch.setattr(cuda, "is_bf16_supported", self.is_bf16_supported)

    def record(self, *entry) -> None:
        with self._lock:
            self.log.append(entry)

    def calls(self, name: str) -> list[tuple]:
        return [entry for entry in self.log if entry[0] == name]

    @staticmethod
    def _index(device) -> int | None:
        if device is None:
            return None
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return device.index

    # --- devices ---------------------------------------------------------------------------------
    def current_device(self) -> int:
        return getattr(self._local, "device", 0)

    def set_device(self, device) -> None:
        index = self._index(device)
        self.record("set_device", index)
        self._local.device = index if index is not None else 0

    @contextlib.contextmanager
    def device(self, device):
        index = self._index(device)
        before = self.current_device()
        if index is not None and index >= 0:
            self._local.device = index
        try:
            yield
        finally:
            self._local.device = before

    def synchronize(self, device=None) -> None:
        index = self._index(device)
        self.record("synchronize", self.current_device() if index is None else index)

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        self.record("is_bf16_supported", self.current_device(), including_emulation)
        return self.bf16 == "native" or (self.bf16 == "emulated" and including_emulation)

    # --- streams ---------------------------------------------------------------------------------
    def _streams(self) -> dict[int, FakeStream]:
        if not hasattr(self._local, "streams"):
            self._local.streams = {}
        return self._local.streams

    def current_stream(self, device=None) -> FakeStream:
        index = self._index(device)
        index = self.current_device() if index is None else index
        self.record("current_stream", index)
        return self._streams().get(index, self._default[index])

    def new_stream(self, device=None, **kwargs) -> FakeStream:
        index = self._index(device)
        index = self.current_device() if index is None else index
        stream = FakeStream(self, f"stream{next(self.counter)}:{index}", index)
        self.record("new_stream", stream.name, index)
        return stream

    @contextlib.contextmanager
    def stream(self, stream: FakeStream | None):
        if stream is None:
            yield
            return
        streams = self._streams()
        before_stream = streams.get(stream.device_index)
        before_device = self.current_device()
        streams[stream.device_index] = stream
        self._local.device = stream.device_index  # as torch.cuda.set_stream does
        try:
            yield
        finally:
            if before_stream is None:
                del streams[stream.device_index]
            else:
                streams[stream.device_index] = before_stream
            self._local.device = before_device

    def stream_of_this_thread(self, index: int) -> str:
        """The name of the stream work on device `index` goes to from the calling thread."""
        return self._streams().get(index, self._default[index]).name


class FakeCudaTensor(torch.Tensor):
    """Host memory that says it is on cuda:`INDEX`; each `copy_` into it is logged with the stream
    current on the copying thread (where a real copy would be queued)."""

    INDEX = 0
    cuda: FakeCuda | None = None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.INDEX)

    def is_pinned(self) -> bool:
        return False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_ and cls.cuda is not None:
            cls.cuda.record("copy", cls.cuda.stream_of_this_thread(cls.INDEX), threading.current_thread().name)
        return super().__torch_function__(func, types, args, kwargs or {})
