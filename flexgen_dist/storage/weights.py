"""Every unit's weights on the tier the placement gives, and loading them for compute.

gpu-tier weights are kept on the compute device in the compute dtype, ready to use. cpu-tier
weights stay in host memory in the storage dtype; disk-tier weights are files in the offload
folder, written once from the checkpoint, one tensor at a time, and reused while the checkpoint
is unchanged. Loading a layer copies its non-resident weights into a slot (a flat buffer of the
compute dtype on the device) that goes back to the pool once the layer has been computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import NotSupportedYet, UserError
from ..planning.layout import Unit, WeightSpec
from ..planning.placement import Placement, Tier
from .slots import Slot, SlotPool
from .tiers import DiskReader, DiskTensor, MemoryTensor, copy, torch_dtype

log = logging.getLogger(__name__)

_ALL = slice(None)
SOURCE_NOTE = "source.json"


class DiskWeightDir:
    """The folder of weight files for one (source, storage dtype).

    The folder name hashes the source's fingerprint, so a changed checkpoint gets a new folder.
    Each file is written under a temporary name and renamed when complete, so a file that exists
    with the right size is complete.
    """

    def __init__(self, offload_dir: str | Path, fingerprint: str, storage_dtype: torch.dtype, reader: DiskReader):
        dtype_name = str(storage_dtype).removeprefix("torch.")
        tag = hashlib.sha256(f"{fingerprint}|{dtype_name}".encode()).hexdigest()[:16]
        self.path = Path(offload_dir) / f"weights-{tag}"
        self.fingerprint = fingerprint
        self.storage_dtype = storage_dtype
        self.reader = reader
        self._itemsize = torch.empty((), dtype=storage_dtype).element_size()

    def file(self, ws: WeightSpec) -> Path:
        return self.path / f"{ws.key}.bin"

    def is_complete(self, ws: WeightSpec) -> bool:
        path = self.file(ws)
        return path.is_file() and path.stat().st_size == ws.numel * self._itemsize

    def write(self, ws: WeightSpec, tensor: torch.Tensor) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.file(ws).with_suffix(f".{os.getpid()}.tmp")
        DiskTensor(tmp, ws.shape, self.storage_dtype, self.reader).write(_ALL, tensor)
        os.replace(tmp, self.file(ws))

    def describe(self) -> None:
        """A note for people looking into the folder: where its files came from."""
        about = self.path / SOURCE_NOTE
        if not about.exists():
            tmp = about.with_suffix(f".{os.getpid()}.tmp")
            dtype_name = str(self.storage_dtype).removeprefix("torch.")
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "dtype": dtype_name}, indent=1))
            os.replace(tmp, about)


@dataclass
class LoadedWeights:
    """One unit's weights on the compute device; `slot` holds the copied ones (None: all resident)."""

    tensors: dict[str, torch.Tensor]
    slot: Slot | None


class WeightStore:
    def __init__(
        self,
        *,
        placement: Placement,
        units: list[Unit],
        source,
        device: torch.device,
        offload_dir: str | Path | None,
        reader: DiskReader | None,
    ):
        self.device = device
        self.compute_dtype = torch_dtype(placement.dtypes.compute)
        storage_dtype = torch_dtype(placement.dtypes.storage)
        pin = placement.policy.pin_weight and device.type == "cuda"
        self.arenas: dict[Tier, SlotPool] = {}  # one slot each: every weight of a memory tier
        views: dict[str, torch.Tensor] = {}
        for tier, where in ((Tier.GPU, device), (Tier.CPU, torch.device("cpu"))):
            pieces, nbytes = placement.weight_layout(tier)
            if nbytes:
                self.arenas[tier] = SlotPool(1, nbytes, where, pin=pin and tier is Tier.CPU)
                arena = self.arenas[tier].take()
                views.update({piece.name: arena.view(piece) for piece in pieces})
        if placement.policy.compress_weight:
            raise NotSupportedYet("weight compression is not wired into the weight store yet")
        self.tensors: dict[int, dict[str, MemoryTensor | DiskTensor]] = {}
        self._layouts = placement.slot_layouts  # layer -> where each loaded tensor goes in a slot
        disk: DiskWeightDir | None = None
        written = 0
        for unit in units:
            placed = {}
            for ws, place in zip(unit.weights, placement.weights[unit.layer_idx]):
                if place.tier is Tier.DISK:
                    if offload_dir is None or reader is None:
                        raise UserError("the policy puts weights on disk but no offload_dir was given; pass --offload-dir DIR")
                    if disk is None:
                        disk = DiskWeightDir(offload_dir, source.fingerprint(), storage_dtype, reader)
                    if not disk.is_complete(ws):
                        disk.write(ws, source.get(ws))
                        written += 1
                    placed[ws.name] = DiskTensor(disk.file(ws), ws.shape, storage_dtype, reader, create=False)
                else:
                    view = views[f"{unit.layer_idx}.{ws.name}"]
                    view.copy_(source.get(ws))  # converted to the tier's dtype (and device)
                    placed[ws.name] = MemoryTensor(view, place.tier)
            self.tensors[unit.layer_idx] = placed
        if disk is not None:
            disk.describe()
            log.info("disk weights in %s (%d tensors written, the rest reused)", disk.path, written)
        self.disk_dir = disk.path if disk is not None else None
        slots = [b for b in placement.working if b.name == "weight slots"]
        self.slots = SlotPool(slots[0].count, slots[0].nbytes_each, device) if slots else None

    def close(self) -> None:
        for pool in (*self.arenas.values(), *([self.slots] if self.slots else [])):
            pool.close()

    def load(self, layer_idx: int) -> LoadedWeights:
        """One unit's weights on the compute device in the compute dtype. Give them back with
        `release` once the layer is computed."""
        placed = self.tensors[layer_idx]
        out = {name: t.data for name, t in placed.items() if isinstance(t, MemoryTensor) and t.tier is Tier.GPU}
        layout = self._layouts[layer_idx]
        if not layout:
            return LoadedWeights(out, None)
        slot = self.slots.take()
        for piece in layout:
            view = slot.view(piece)
            copy(view, _ALL, placed[piece.name])
            out[piece.name] = view
        return LoadedWeights(out, slot)

    def release(self, loaded: LoadedWeights) -> None:
        if loaded.slot is not None:
            self.slots.give(loaded.slot)
