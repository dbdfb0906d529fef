"""Every unit's weights placed on the tiers a policy asks for.

Within a unit, weights are split by cumulative size (FlexGen's rule): the first `w_gpu_percent`
of its bytes on the gpu tier in the compute dtype, ready to use; the next `w_cpu_percent` in host
memory in the storage dtype; the rest as files in the offload folder, written once from the
checkpoint, one tensor at a time, and reused by the next run when the checkpoint is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import UserError
from ..model.units import Unit, WeightSpec
from ..planning.policy import Policy, choose_tiers
from .tiers import BufferPool, DiskIO, DiskTensor, MemoryTensor, ReadBuffers

log = logging.getLogger(__name__)

_ALL = slice(None)
SOURCE_NOTE = "source.json"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class DiskWeightDir:
    """The folder of weight files for one (source, storage dtype).

    The folder name hashes the source's fingerprint, so a changed checkpoint gets a new folder.
    Each file is written under a temporary name and renamed when complete, so a file that exists
    with the right size is complete: a crash never leaves a torn file that looks finished, and
    ranks that write their own layers into the same folder need no shared manifest.
    """

    def __init__(self, offload_dir: str | Path, fingerprint: str, storage_dtype: torch.dtype):
        tag = hashlib.sha256(f"{fingerprint}|{_dtype_name(storage_dtype)}".encode()).hexdigest()[:16]
        self.path = Path(offload_dir) / f"weights-{tag}"
        self.fingerprint = fingerprint
        self.storage_dtype = storage_dtype
        self._itemsize = torch.empty((), dtype=storage_dtype).element_size()

    def file(self, ws: WeightSpec) -> Path:
        return self.path / f"{ws.key}.bin"

    def is_complete(self, ws: WeightSpec) -> bool:
        path = self.file(ws)
        return path.is_file() and path.stat().st_size == ws.numel * self._itemsize

    def write(self, ws: WeightSpec, tensor: torch.Tensor) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.file(ws).with_suffix(f".{os.getpid()}.tmp")
        DiskTensor(tmp, ws.shape, self.storage_dtype).write(_ALL, tensor)
        os.replace(tmp, self.file(ws))

    def describe(self) -> None:
        """A note for people looking into the folder: where its files came from."""
        about = self.path / SOURCE_NOTE
        if not about.exists():
            tmp = about.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "dtype": _dtype_name(self.storage_dtype)}, indent=1))
            os.replace(tmp, about)


class WeightStore:
    def __init__(
        self,
        units: list[Unit],
        source,
        policy: Policy,
        device: torch.device,
        compute_dtype: torch.dtype,
        storage_dtype: torch.dtype,
        offload_dir: str | Path | None,
        *,
        disk_io: DiskIO = DiskIO(),
    ):
        self.device = device
        self.compute_dtype = compute_dtype
        self._buffers = BufferPool(device, compute_dtype)  # where copied weights land, reused
        self.tensors: dict[int, dict[str, MemoryTensor | DiskTensor]] = {}
        pin = policy.pin_weight and device.type == "cuda"
        disk: DiskWeightDir | None = None
        buffers = ReadBuffers()  # one per thread for all disk weights
        written = 0
        for unit in units:
            tiers = choose_tiers([ws.numel for ws in unit.weights], policy.percents("w"))
            placed = {}
            for ws, tier in zip(unit.weights, tiers):
                if tier == "disk":
                    if offload_dir is None:
                        raise UserError("the policy puts weights on disk but no offload_dir was given; pass --offload-dir DIR")
                    if disk is None:
                        disk = DiskWeightDir(offload_dir, source.fingerprint(), storage_dtype)
                    if not disk.is_complete(ws):
                        disk.write(ws, source.get(ws))
                        written += 1
                    placed[ws.name] = DiskTensor(disk.file(ws), ws.shape, storage_dtype, create=False, io=disk_io, buffers=buffers)
                elif tier == "cpu":
                    data = source.get(ws).to(storage_dtype)
                    placed[ws.name] = MemoryTensor(data.pin_memory() if pin else data, "cpu")
                else:
                    placed[ws.name] = MemoryTensor(source.get(ws).to(device, compute_dtype), "gpu")
            self.tensors[unit.layer_idx] = placed
        if disk is not None:
            disk.describe()
            log.info("disk weights in %s (%d tensors written, the rest reused)", disk.path, written)
        self.disk_dir = disk.path if disk is not None else None
        # Disk reads of one layer are spread over their own threads (not the engine's prefetch
        # pool, whose tasks wait on these).
        has_disk = disk is not None
        self._read_pool = ThreadPoolExecutor(disk_io.threads, thread_name_prefix="flexgen-read") if has_disk and disk_io.threads > 1 else None

    def close(self) -> None:
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=True)
            self._read_pool = None

    def load(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """One unit's weights on the compute device in the compute dtype.

        Weights that need a copy (cpu and disk tiers) land in buffers reused from earlier loads:
        a fresh multi-MB tensor per layer per token costs page faults on every step. Give them
        back with `release` once the layer is computed."""
        out = {}
        for name, t in self.tensors[layer_idx].items():
            if isinstance(t, MemoryTensor) and t.tier == "gpu":
                out[name] = t.data  # resident, ready to use
                continue
            buf = self._buffers.take(t.shape)
            if isinstance(t, DiskTensor):
                t.read_into(buf, self._read_pool)
            else:
                buf.copy_(t.data, non_blocking=t.data.is_pinned())
            out[name] = buf
        return out

    def release(self, weights: dict[str, torch.Tensor]) -> None:
        """Return a loaded unit's copied weights to the buffer pool (the caller is done with them)."""
        self._buffers.give(weights.values())

    def bytes_per_tier(self) -> dict[str, int]:
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        for placed in self.tensors.values():
            for t in placed.values():
                out[t.tier] += t.nbytes
        return out
