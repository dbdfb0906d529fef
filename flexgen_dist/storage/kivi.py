"""A KV cache tensor quantized as KIVI does (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache", ICML 2024): keys per channel, values per token, the newest slots in
full precision.

Keys have a few channels of large magnitude (outliers that RoPE does not mix away); grouped
along the head dimension, as FlexGen does, one outlier sets the scale of every channel beside it.
Grouped per channel over G consecutive slots, each channel keeps a range of its own. Values have
no such channels and attention mixes them per token: they keep groups along the head dimension.

Layout, for a tensor of S slots (S, B, nkv, hd) and groups of G (planning/compression.py):
- keys: a quantized row per group of slots [gG, gG + G), the group's slots last:
  (ceil(S / G), B, nkv, hd, G), one group per channel. The ring's last group (S % G slots, when
  there are) is padded with its last slot.
- values: (S, B, nkv, hd) in groups along the head dimension (min-max, as before).
- the window: (min(G, S), B, nkv, hd) in the cache dtype: the slots of the group being filled.

Writes. A block writes its slots in order round a ring (engine/refill.py): the prefill [0, W),
then one slot a step, (last + 1) mod S. Such a write fills the window; once a group's last slot
is written and the step's attention has read it (`seal`, or the next write), the group's keys
and values are quantized once, from the window, which is then free for the next group. (A group
whole in one write, as in a prefill, is quantized at once.) Any other write (a new prompt taking a finished row: slots behind the newest,
every row rewritten as read) goes to the window for the slots it holds, elsewhere to the
quantized rows: values slot by slot, keys by dequantizing their group, replacing those slots and
quantizing the group again. The groups follow the ring's slots, not a row's positions, so every
row of a block completes a group at the same step.

Slots without a token (left padding, what a finished sequence left in a row that took a new
prompt; `valid`, the batch's rows of the block's (B, S) mask) do not widen a channel's range: they
are given the mean of the group's valid slots of that channel before its keys are quantized.

Reads of slots [a, b): the window's slots from the window, exactly as written; the others
dequantized, keys a group at a time (straight into the destination for a whole group, through
a group-sized buffer for one cut by [a, b): the dequantization scratch the plan counts).
Attention reads whole groups of keys as stored (`read_groups`, engine/kv_views.py StoredKV): a
score per slot of each group, with no transposing copy into position order.
"""

from __future__ import annotations

import torch

from ..planning.compression import CompressionConfig, cache_quantized_shape, cache_window_shape
from ..planning.placement import Tier
from .compressed import CompressedTensor, compressed_in_memory, compressed_on_disk
from .tiers import DiskTensor, MemoryTensor, _rows

_ALL = slice(None)


class KiviTensor:
    def __init__(self, which: str, quantized: CompressedTensor, window: MemoryTensor | DiskTensor, shape,
                 config: CompressionConfig, tier: Tier, valid: torch.Tensor | None = None):
        self.which = which  # "k": per channel over groups of slots; "v": per token
        self.quantized = quantized
        self.window = window
        self.shape = tuple(shape)  # (S, B, nkv, hd)
        self.config = config
        self.tier = tier
        self.valid = valid  # (B, S) bool, updated in place by the block; None: every slot holds a token
        self.group_slots = config.group_size
        self._group: int | None = None  # the group of slots the window holds
        self._filled = 0  # the window holds its first `_filled` slots
        self._last: int | None = None  # the newest slot written in order
        self._complete: torch.device | None = None  # the window's group is complete: quantize it on this device
        self._complete_valid: torch.Tensor | None = None  # its slots' `valid` when it was completed

    @property
    def parts(self) -> tuple:
        return (*self.quantized.parts, self.window)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    @property
    def dtype(self) -> torch.dtype:
        return self.window.dtype

    def window_slots(self) -> tuple[int, int]:
        """The slots [start, stop) read from the window (empty when it holds none)."""
        if self._group is None:
            return 0, 0
        start = self._group * self.group_slots
        return start, start + self._filled

    def _bounds(self, group: int) -> tuple[int, int]:
        start = group * self.group_slots
        return start, min(start + self.group_slots, self.shape[0])

    def _groups(self, a: int, b: int):
        """(group, lo, hi, start, end) of each group of slots [start, end) that [a, b) meets."""
        for group in range(a // self.group_slots, (b - 1) // self.group_slots + 1):
            start, end = self._bounds(group)
            yield group, max(a, start), min(b, end), start, end

    # --- writes ------------------------------------------------------------------------------------
    def write(self, index: slice, value: torch.Tensor) -> None:
        """Slots `index` = value (n, B, nkv, hd): see the module docstring."""
        a, b = _rows(index, self.shape[0])
        if b <= a:
            return
        self.seal()
        in_order = a == (0 if self._last is None else (self._last + 1) % self.shape[0])
        for group, lo, hi, start, end in self._groups(a, b):
            part = value[lo - a : hi - a]
            if in_order and (lo == start or (self._group == group and lo == start + self._filled)):
                self._fill(group, lo, hi, start, end, part)
            else:
                self._rewrite(group, lo, hi, start, part)
        if in_order:
            self._last = b - 1

    def _fill(self, group: int, lo: int, hi: int, start: int, end: int, part: torch.Tensor) -> None:
        if lo == start:  # a group starts: the one before it ended at its last slot, so none is held
            if hi == end:  # whole in this write
                self._quantize(group, part)
                return
            self._group, self._filled = group, 0
        self.window.write(slice(lo - start, hi - start), part)
        self._filled = hi - start
        if hi == end:  # quantized by `seal`, once this step's attention has read it, as the step saw it
            self._complete = part.device
            self._complete_valid = None if self.valid is None else self.valid[:, start:end].clone()

    def seal(self) -> None:
        """Quantize the window's group if it is complete. The engine calls this when it stores a
        step's rows (engine/block_io.py), after the step's attention: attention over the cache
        in place and over a copy loaded before the step's write then read the same values."""
        if self._complete is not None:
            start, end = self._bounds(self._group)
            self._quantize(self._group, self._window_rows(end - start, self._complete), self._complete_valid)
            self._group, self._filled, self._complete = None, 0, None

    def _rewrite(self, group: int, lo: int, hi: int, start: int, part: torch.Tensor) -> None:
        if group == self._group:
            held = start + self._filled
            if lo < held:
                self.window.write(slice(lo - start, min(hi, held) - start), part[: min(hi, held) - lo])
            if hi <= held:
                return
            part, lo = part[max(0, held - lo) :], max(lo, held)
        if self.which == "v":
            self.quantized.write(slice(lo, hi), part)
            return
        slots = self._read_group(group, part.device)
        slots[lo - start : hi - start] = part
        self._quantize(group, slots)

    def _quantize(self, group: int, slots: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Slots (n, B, nkv, hd) of a whole group, quantized into its rows; `valid` (B, n): which
        hold a token (default: the block's mask now)."""
        start, end = self._bounds(group)
        if self.which == "v":
            self.quantized.write(slice(start, end), slots)
            return
        x = slots.float()
        if valid is None and self.valid is not None:
            valid = self.valid[:, start:end]
        if valid is not None:
            keep = valid.to(x.device).t()[:, :, None, None]  # (n, B, 1, 1)
            count = keep.sum(0)  # (B, 1, 1)
            mean = (x * keep).sum(0) / count.clamp(min=1)  # (B, nkv, hd)
            x = torch.where(keep, x, mean)
        if end - start < self.group_slots:  # the ring's last, shorter group: padded with its last slot
            x = torch.cat([x, x[-1:].expand(self.group_slots - (end - start), *x.shape[1:])])
        self.quantized.write(slice(group, group + 1), x.permute(1, 2, 3, 0).unsqueeze(0))  # (1, B, nkv, hd, G)

    # --- reads -------------------------------------------------------------------------------------
    def read_into(self, out: torch.Tensor, index: slice = _ALL, staging=None) -> torch.Tensor:
        """Slots `index` into out[:n] (out's device and dtype). `staging`: a QuantizedTensor of the
        quantized shape on out's device, for quantized parts that are not there."""
        a, b = _rows(index, self.shape[0])
        w_start, w_stop = self.window_slots()
        wa, wb = max(a, w_start), min(b, w_stop)
        quantized = [(a, b)] if wa >= wb else [(a, wa), (wb, b)]
        for qa, qb in quantized:
            if qa < qb:
                self._read_quantized(out[qa - a : qb - a], qa, qb, staging)
        if wa < wb:
            self._read_window(out[wa - a : wb - a], wa - w_start, wb - w_start)
        return out

    def whole_groups(self, a: int, b: int, fresh: slice) -> tuple[int, int]:
        """The groups [first, stop) of keys quantized whole in slots [a, b), before the window's
        group and the slots `fresh` (a step's own, read as computed) where those lie in [a, b):
        `read_groups` reads them as stored."""
        G = self.group_slots
        first, stop = -(-a // G), min(b, self.shape[0] - self.shape[0] % G) // G  # not the ring's shorter group
        for lo, hi in (self.window_slots(), (fresh.start, fresh.stop)):
            if lo < hi and lo < stop * G and hi > first * G:  # groups from the one holding `lo` on are not whole
                stop = max(first, lo // G)
        return first, max(first, stop)

    def read_groups(self, first: int, stop: int, device: torch.device) -> torch.Tensor:
        """The keys of groups [first, stop) as stored, (n, B, nkv, hd, G) fp32 on `device`: slot
        start + j of group n at [n, ..., j] (no transposing copy; see `whole_groups`)."""
        out = torch.empty((stop - first, *self.quantized.shape[1:]), dtype=torch.float32, device=device)
        return self.quantized.read_into(out, slice(first, stop))

    def _read_quantized(self, out: torch.Tensor, a: int, b: int, staging) -> None:
        if self.which == "v":
            self.quantized.read_into(out, slice(a, b), staging)
            return
        G = self.group_slots
        first, stop = -(-a // G), b // G  # the whole groups of G slots in [a, b)
        if first < stop:
            whole = out[first * G - a : stop * G - a]  # (n * G, B, nkv, hd)
            groups = whole.unflatten(0, (stop - first, G)).permute(0, 2, 3, 4, 1)  # (n, B, nkv, hd, G), a view
            self.quantized.read_into(groups, slice(first, stop), staging)
        for group, lo, hi, start, end in self._groups(a, b):
            if not (first <= group < stop):  # cut by [a, b), or the ring's shorter last group
                out[lo - a : hi - a] = self._read_group(group, out.device, staging)[lo - start : hi - start]

    def _read_group(self, group: int, device: torch.device, staging=None) -> torch.Tensor:
        """A group's keys dequantized, (n, B, nkv, hd) fp32 on `device` (a view of a new buffer)."""
        start, end = self._bounds(group)
        buffer = torch.empty((1, *self.quantized.shape[1:]), dtype=torch.float32, device=device)  # (1, B, nkv, hd, G)
        self.quantized.read_into(buffer, slice(group, group + 1), staging)
        return buffer[0].permute(3, 0, 1, 2)[: end - start]

    def _read_window(self, out: torch.Tensor, i: int, j: int) -> None:
        if isinstance(self.window, MemoryTensor):
            out.copy_(self.window.data[i:j])
        else:
            self.window.read_into(out, slice(i, j))

    def _window_rows(self, n: int, device: torch.device) -> torch.Tensor:
        """The window's first n slots on `device` (after every write queued to it)."""
        out = torch.empty((n, *self.shape[1:]), dtype=self.window.dtype, device=device)
        self._read_window(out, 0, n)
        return out

    def read_rows(self, rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Slots at sorted, distinct positions `rows` (sparse attention's values): values read at
        those rows only, keys over their range."""
        out = torch.empty((len(rows), *self.shape[1:]), dtype=dtype, device=device)
        if len(rows) == 0:
            return out
        if self.which == "k":
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            span = self.read_into(torch.empty((hi - lo, *self.shape[1:]), dtype=dtype, device=device), slice(lo, hi))
            return span[(rows - lo).to(device)]
        w_start, w_stop = self.window_slots()
        held = (rows >= w_start) & (rows < w_stop)
        if bool((~held).any()):
            out[(~held).to(device)] = self.quantized.read_rows(rows[~held], device, dtype)
        if bool(held.any()):
            out[held.to(device)] = self._window_rows(w_stop - w_start, device)[(rows[held] - w_start).to(device)].to(dtype)
        return out

    def overlay_window(self, values: torch.Tensor, positions: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """Values (B, nh, k, hd) gathered from the quantized rows at positions (B, nh, k), with
        those the window holds read from it instead (no value read back to the host)."""
        w_start, w_stop = self.window_slots()
        if w_start == w_stop:
            return values
        B, nh, _ = positions.shape
        where = positions.device
        window = self._window_rows(w_stop - w_start, where)  # (n, B, nkv, hd)
        index = ((positions - w_start).clamp(0, w_stop - w_start - 1), torch.arange(B, device=where)[:, None, None],
                 (torch.arange(nh, device=where) // (nh // num_kv_heads))[None, :, None])
        held = (positions >= w_start) & (positions < w_stop)
        return torch.where(held[..., None], window[index].to(values.dtype), values)


def kivi_in_memory(which: str, views: dict[str, torch.Tensor], shape, config: CompressionConfig, tier: Tier,
                   valid: torch.Tensor | None = None) -> KiviTensor:
    """`views`: the tensor of each part ("data", "scale", "mins", "window") in the block's slot."""
    quantized = compressed_in_memory(tuple(views[p] for p in ("data", "scale", "mins")),
                                     cache_quantized_shape(which, shape, config), config, tier)
    return KiviTensor(which, quantized, MemoryTensor(views["window"], tier), shape, config, tier, valid)


def kivi_on_disk(which: str, base_path, shape, config: CompressionConfig, window_dtype: torch.dtype, reader,
                 valid: torch.Tensor | None = None) -> KiviTensor:
    """Four files: `<base>.data`, `<base>.scale`, `<base>.mins` and `<base>.window`."""
    quantized = compressed_on_disk(base_path, cache_quantized_shape(which, shape, config), config, reader)
    window = DiskTensor(f"{base_path}.window", cache_window_shape(shape, config), window_dtype, reader)
    return KiviTensor(which, quantized, window, shape, config, Tier.DISK, valid)
