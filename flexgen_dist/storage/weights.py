"""Every unit's weights on the tier the placement gives, and loading them for compute.

gpu-tier weights live in one device arena in the compute dtype, ready to use; cpu-tier weights
in one host arena (pinned at its exact size beside a GPU) in the storage dtype; disk-tier weights
are files in a verified offload folder (storage/offload_dir.py), written once from the checkpoint
and reused while the checkpoint, the dtype and the compression settings are unchanged. With
weight compression every 2-D weight is quantized once, when it is written to its tier, and stays
compressed there; weights the checkpoint holds as groups already (a GGUF's Q4_0 / Q4_1 / Q8_0) are
compressed whatever the policy says, and written as the file holds them, never quantized again.

Loading a layer fills a slot (a flat buffer on the compute device, planning/place.py lays it
out): compressed bytes that are not yet in device memory are copied into the slot's staging
first, then every non-resident weight is dequantized or converted into the compute dtype. This
happens once per layer per token of a block, never per GPU batch. Two weights are not copied
whole (storage/rows.py): embedding tables, whose rows each step gathers from their tier, and a
head projection larger than the slot, streamed through it a chunk of rows at a time. In a decode
step the experts of a mixture of experts are not copied with their layer: each is copied into
its place in the slot when the router first chooses it for some row of the block
(`OnDemand`), so a step moves the experts its rows use, not all of them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import UserError
from ..files import check_offload_space
from ..spec.layout import Unit
from ..planning.placement import Placement, Tier, WeightPlace
from ..sizes import format_size
from .slots import Slot, SlotPool
from .tiers import ALL, DiskReader, DiskTensor, MemoryTensor, copy, layout_of, torch_dtype

# storage/quantize.py is imported where a weight is compressed, storage/rows.py where a table is not
# resident or a head is larger than the slot: a run that needs neither never loads them.

if TYPE_CHECKING:  # annotations only: the offload folder's modules load with weights on disk (_open_folder)
    from .offload_dir import OffloadFolder
    from .rows import RowTable, StreamedRows

log = logging.getLogger(__name__)

_PARTS = ("data", "scale", "mins")


@dataclass
class LoadedWeights:
    """One unit's weights on the compute device; `slot` holds the copied ones (None: none copied)."""

    tensors: dict[str, torch.Tensor | RowTable | StreamedRows]
    slot: Slot | None


class OnDemand(dict):
    """A layer's loaded weights, some of which (a decode step's experts) are copied into their
    place in the slot when first read: `w[name]` copies, later reads find it there."""

    def __init__(self, loaded: dict, pending: dict[str, Callable[[], torch.Tensor]]):
        super().__init__(loaded)
        self._pending = pending

    def __missing__(self, name: str) -> torch.Tensor:
        fetch = self._pending.pop(name, None)
        if fetch is None:
            raise KeyError(name)
        value = self[name] = fetch()
        return value

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or name in self._pending

    def get(self, name: str, default=None):
        return self[name] if name in self else default


@dataclass
class LoadCounts:
    """What the store's loads moved from the weights' tiers (their stored bytes), since it was
    made: all of it, and of it the experts loaded on demand, of how many a decode step offered."""

    loads: int = 0  # layer loads
    nbytes: int = 0  # every copied weight's bytes on its tier
    expert_nbytes: int = 0
    experts_offered: int = 0  # expert tensors that decode-step loads left to be chosen
    experts_loaded: int = 0  # of them, those a row chose (so copied)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


class WeightStore:
    def __init__(self, *, placement: Placement, units: list[Unit], source, device: torch.device,
                 offload_dir: str | Path | None, reader: DiskReader | None, verify: bool = False,
                 prune: bool = False):
        self.device = device
        self.compute_dtype = torch_dtype(placement.dtypes.compute)
        self.storage_dtype = torch_dtype(placement.dtypes.storage)
        self.config = placement.policy.compression
        self.fitted = self.config.weight_method == "fitted"  # weights quantized once: fit each group
        pin = device if placement.policy.pin_weight and device.type == "cuda" else None
        self.arenas: dict[Tier, SlotPool] = {}  # one slot each: every weight of a memory tier
        self.slots: SlotPool | None = None
        self.counts = LoadCounts()
        try:
            self._build(placement, units, source, offload_dir, reader, verify, pin, prune)
        except BaseException:
            self.close()  # unpin what was pinned now, not whenever the store is collected
            raise

    def _build(self, placement: Placement, units: list[Unit], source, offload_dir, reader, verify: bool,
               pin: torch.device | None, prune: bool) -> None:
        device = self.device
        self._views: dict[str, torch.Tensor] = {}  # "{layer}.{name}" or "...{name}.{part}" -> its arena view
        for tier, where in ((Tier.GPU, device), (Tier.CPU, torch.device("cpu"))):
            pieces, nbytes = placement.weight_layout(tier)
            if nbytes:
                self.arenas[tier] = SlotPool(1, nbytes, where, pin=pin if tier is Tier.CPU else None)
                arena = self.arenas[tier].take()
                for piece in pieces:
                    key = piece.name if piece.part == "value" else f"{piece.name}.{piece.part}"
                    self._views[key] = arena.view(piece)
        self._reader = reader
        self._folder: OffloadFolder | None = None
        disk = [(unit, ws, place) for unit in units for ws, place in zip(unit.weights, placement.weights[unit.layer_idx])
                if place.tier is Tier.DISK]
        if disk:
            if offload_dir is None or reader is None:
                raise UserError("the policy puts weights on disk but no offload folder was given; pass --offload-dir DIR")
            check_offload_space(offload_dir, 0)  # a folder we can write, before looking inside it
            self._folder = _open_folder(offload_dir, source, placement, verify=verify, prune=prune)
            # Before writing anything: room for the files still missing and the run's cache and activations.
            sizes = {}
            for _, ws, place in disk:
                if place.compressed:
                    from .quantize import empty_quantized

                    like = empty_quantized((1, *ws.shape[1:]), self.config)
                    sizes.update({f"{ws.key}.{part}": getattr(like, part).nbytes * ws.shape[0] for part in _PARTS})
                else:
                    sizes[ws.key] = place.nbytes
            scratch = placement.cache_bytes()[Tier.DISK] + placement.act_bytes()[Tier.DISK]
            check_offload_space(offload_dir, self._folder.missing_bytes(sizes) + scratch)
        self.tensors: dict[int, dict[str, object]] = {}  # layer -> name -> its tier tensor
        by_key: dict[str, object] = {}  # checkpoint key -> its tier tensor (a tied head shares the table's)
        written = 0
        for unit in units:
            placed = {}
            for ws, place in zip(unit.weights, placement.weights[unit.layer_idx]):
                if place.shared:
                    placed[ws.name] = by_key[ws.key]
                    continue
                placed[ws.name], wrote = self._place(unit, ws, place, source)
                by_key.setdefault(ws.key, placed[ws.name])
                written += wrote
            self.tensors[unit.layer_idx] = placed
        if self._folder is not None:
            log.info("disk weights in %s (%d files written, the rest reused)", self._folder.path, written)
            self._folder.close()
        self.disk_dir = self._folder.path if self._folder is not None else None
        self._layouts = placement.slot_layouts  # layer -> where each loaded tensor goes in a slot
        self._gathered = {layer_idx: [w.name for w in places if w.gathered] for layer_idx, places in placement.weights.items()}
        self._stored = {layer_idx: {w.name: w.nbytes for w in places} for layer_idx, places in placement.weights.items()}
        self._experts = {layer_idx: {w.name for w in places if w.expert} for layer_idx, places in placement.weights.items()}
        slots = [b for b in placement.working if b.name == "weight slots"]
        self.slots = SlotPool(slots[0].count, slots[0].nbytes_each, device) if slots else None

    def _place(self, unit: Unit, ws, place: WeightPlace, source) -> tuple[object, int]:
        """The tier tensor of one weight, written from the checkpoint; and how many files were written."""
        name = f"{unit.layer_idx}.{ws.name}"
        if place.tier is Tier.DISK:
            return self._on_disk(ws, place, source)
        if place.compressed:
            from .quantize import QuantizedTensor, compressed_in_memory

            parts = tuple(self._views[f"{name}.{part}"] for part in _PARTS)
            held = QuantizedTensor(*parts, shape=ws.shape, dtype=self.compute_dtype, config=self.config)
            held.copy_(self._quantized(ws, source, parts[0].device))
            return compressed_in_memory(parts, ws.shape, self.config, place.tier), 0
        view = self._views[name]
        view.copy_(source.get(ws))  # converted to the tier's dtype (and device)
        return MemoryTensor(view, place.tier), 0

    def _on_disk(self, ws, place: WeightPlace, source) -> tuple[object, int]:
        folder = self._folder
        if not place.compressed:
            nbytes = ws.numel * self.storage_dtype.itemsize
            path = folder.trusted(ws.key, nbytes)
            wrote = path is None
            if wrote:
                path = folder.write(ws.key, source.get(ws).to(self.storage_dtype).contiguous())
            return DiskTensor(path, ws.shape, self.storage_dtype, self._reader, create=False), int(wrote)
        from .quantize import CompressedTensor, empty_quantized

        like = empty_quantized((1, *ws.shape[1:]), self.config)
        sizes = {part: getattr(like, part).numel() * getattr(like, part).element_size() * ws.shape[0] for part in _PARTS}
        paths = {part: folder.trusted(f"{ws.key}.{part}", sizes[part]) for part in _PARTS}
        wrote = 0
        if any(path is None for path in paths.values()):
            q = self._quantized(ws, source, torch.device("cpu"))
            paths = {part: folder.write(f"{ws.key}.{part}", getattr(q, part).contiguous()) for part in _PARTS}
            wrote = len(_PARTS)
        parts = [DiskTensor(paths[part], (ws.shape[0], *getattr(like, part).shape[1:]), getattr(like, part).dtype,
                            self._reader, create=False) for part in _PARTS]
        return CompressedTensor(*parts, shape=ws.shape, config=self.config, tier=Tier.DISK), wrote

    def _quantized(self, ws, source, device: torch.device):
        """The weight as groups: as the checkpoint holds them (a GGUF's Q4_0 / Q4_1 / Q8_0 blocks,
        exactly), else quantized now (on `device`: fast on a GPU)."""
        grouped = getattr(source, "grouped", None)
        held = grouped(ws, self.config) if grouped is not None else None
        if held is not None:
            return held
        from .quantize import quantize

        return quantize(source.get(ws).to(device), self.config, fitted=self.fitted)  # in fp32 whatever its dtype

    def close(self) -> None:
        """Unpin the host arena (a store dropped without this unpins when it is collected)."""
        for pool in (*self.arenas.values(), *([self.slots] if self.slots else [])):
            pool.close()

    def load(self, layer_idx: int, experts_on_demand: bool = False) -> LoadedWeights:
        """One unit's weights on the compute device in the compute dtype. Give them back with
        `release` once the layer is computed. An embedding table that is not resident comes as a
        `RowTable` (the step gathers its rows), a head projection larger than the slot as
        `StreamedRows` holding its first chunk. With `experts_on_demand` (a decode step) the
        experts that are not resident are copied only when the step reads them (`OnDemand`)."""
        placed = self.tensors[layer_idx]
        out = {name: t.data for name, t in placed.items() if isinstance(t, MemoryTensor) and t.tier is Tier.GPU}
        for name in self._gathered[layer_idx]:
            if name not in out:
                from .rows import RowTable

                out[name] = RowTable(placed[name], self.device, self.compute_dtype)
        layout = self._layouts[layer_idx]
        if not layout:
            return LoadedWeights(out, None)
        slot = self.slots.take()
        staging: dict[str, dict[str, torch.Tensor]] = {}
        pending: dict[str, Callable[[], torch.Tensor]] = {}
        stored = self._stored[layer_idx]
        on_demand = self._experts[layer_idx] if experts_on_demand else set()
        copied = 0
        for piece in layout:
            if piece.part != "value":
                staging.setdefault(piece.name, {})[piece.part] = slot.view(piece)
                continue
            view = slot.view(piece)
            src = placed[piece.name]
            stage = None
            if piece.name in staging:  # a compressed weight: its parts come through the slot's staging
                from .quantize import QuantizedTensor

                parts = staging[piece.name]
                stage = QuantizedTensor(parts["data"], parts["scale"], parts["mins"], tuple(view.shape), view.dtype, self.config)
            if view.shape[0] < src.shape[0]:  # a chunk of rows at a time (planning: WeightPlace.chunk_rows)
                from .rows import StreamedRows

                out[piece.name] = StreamedRows(src, view, stage)
                out[piece.name].fill(0)
                copied += stored[piece.name]
                continue
            if piece.name in on_demand:
                pending[piece.name] = self._fetcher(view, src, stage, stored[piece.name])
                continue
            copy(view, ALL, src, ALL, stage)
            out[piece.name] = view
            copied += stored[piece.name]
        self.counts.add(loads=1, nbytes=copied, experts_offered=len(pending))
        return LoadedWeights(OnDemand(out, pending) if pending else out, slot)

    def _fetcher(self, view: torch.Tensor, src, stage, nbytes: int) -> Callable[[], torch.Tensor]:
        def fetch() -> torch.Tensor:
            copy(view, ALL, src, ALL, stage)
            self.counts.add(nbytes=nbytes, expert_nbytes=nbytes, experts_loaded=1)
            return view
        return fetch

    def release(self, loaded: LoadedWeights) -> None:
        if loaded.slot is not None:
            self.slots.give(loaded.slot)

    @property
    def compressed(self) -> bool:
        return any(layout_of(t) == "groups" for placed in self.tensors.values() for t in placed.values())


def _open_folder(offload_dir, source, placement: Placement, *, verify: bool, prune: bool) -> OffloadFolder:
    """The verified folder of these weights in the offload folder (the one place that imports the
    offload folder's modules: a run with no weights on disk never loads them). It is named by what
    its files are made from: the checkpoint (its headers, sizes and mtimes) or a generated source,
    the storage dtype and the compression settings. The folders of checkpoints that are gone get a
    warning each, or are removed with `prune` (--prune-offload): never silently kept, never
    silently deleted."""
    from .offload_dir import OffloadFolder, remove_folder, stale_folders
    from .offload_identity import OffloadIdentity, checkpoint_identity

    compression = placement.policy.compression if placement.policy.compress_weight else None
    files = getattr(source, "weight_files", None)
    if files is not None:
        identity = checkpoint_identity(files(), storage_dtype=placement.dtypes.storage, compression=compression)
    else:
        identity = OffloadIdentity.of(source.fingerprint(), storage_dtype=placement.dtypes.storage, compression=compression)
    folder = OffloadFolder(offload_dir, identity, verify=verify, weight_files=files() if files is not None else ())
    for stale in stale_folders(offload_dir, keep=folder.path.name):
        if not prune:
            log.warning("%s (%s) holds the weights of a checkpoint that is gone: %s; remove it, or pass "
                        "--prune-offload", stale.path, format_size(stale.nbytes), stale.why)
            continue
        try:
            remove_folder(stale)
        except (OSError, UserError) as exc:
            log.warning("cannot remove %s (%s)", stale.path, exc)
            continue
        log.info("removed %s (%s): %s", stale.path, format_size(stale.nbytes), stale.why)
    return folder
