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
- the window: the slots of n = `window_groups` groups (planning/compression.py
  `cache_window_shape`: G rows for each of n groups, or of as many as the cache has if fewer; S
  rows when the cache is one group shorter than G) in the cache dtype; each
  held group has G rows of its own, wherever the ring put it.

Writes. A block writes its slots in order round a ring (engine/refill.py): the prefill [0, W),
then one slot a step, (last + 1) mod S. Such a write goes to the window: a group that starts
takes a free part of it. Once the newest group is complete and the step's attention has read
it (`seal`, or the next write), a full window makes room: its oldest group's keys and values are
quantized once, from the window. So the newest slots, from (n - 1) G to n G - 1 of them, are
always exact (KIVI's residual; with n = 1 only the group being filled, none right after it
completes). A prefill longer than the window quantizes its older groups as it writes them. A
cache of fewer groups than the window holds is never quantized. Any other write (a new prompt
taking a finished row: slots behind the newest, every row rewritten as read) goes to the window
for the slots it holds, elsewhere to the quantized rows: values slot by slot, keys by
dequantizing their group, replacing those slots and quantizing the group again. The groups
follow the ring's slots, not a row's positions, so every row of a block completes a group at the
same step.

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
from .quantize import CompressedTensor, compressed_in_memory, compressed_on_disk
from .tiers import DiskTensor, MemoryTensor, _rows

_ALL = slice(None)


class KiviTensor:
    LAYOUT = "kivi"

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
        self.window_groups = config.window_groups
        # The groups the window holds, oldest first, each [group, its first window row, slots held
        # (from the group's first)]; only the newest may be incomplete.
        self._held: list[list[int]] = []
        self._last: int | None = None  # the newest slot written in order
        self._complete: torch.device | None = None  # the newest group is complete: `seal` makes room, on this device

    @property
    def parts(self) -> tuple:
        return (*self.quantized.parts, self.window)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    @property
    def dtype(self) -> torch.dtype:
        return self.window.dtype

    def window_ranges(self) -> list[tuple[int, int, int]]:
        """(start, stop, window row of start) of the slots read from the window, oldest first."""
        return [(group * self.group_slots, group * self.group_slots + held, row) for group, row, held in self._held if held]

    def _bounds(self, group: int) -> tuple[int, int]:
        start = group * self.group_slots
        return start, min(start + self.group_slots, self.shape[0])

    def _groups(self, a: int, b: int):
        """(group, lo, hi, start, end) of each group of slots [start, end) that [a, b) meets."""
        for group in range(a // self.group_slots, (b - 1) // self.group_slots + 1):
            start, end = self._bounds(group)
            yield group, max(a, start), min(b, end), start, end

    def _find(self, group: int) -> list[int] | None:
        return next((h for h in self._held if h[0] == group), None)

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
            newest = self._held[-1] if self._held else None
            if in_order and (lo == start or (newest is not None and newest[0] == group and lo == start + newest[2])):
                self._fill(group, lo, hi, start, end, part)
            else:
                self._rewrite(group, lo, hi, start, part)
        if in_order:
            self._last = b - 1

    def _fill(self, group: int, lo: int, hi: int, start: int, end: int, part: torch.Tensor) -> None:
        if lo == start:  # a group starts: the newest group of the window, in a free part of it
            held = self._find(group)
            if held is not None:  # the ring came round to a group the window still holds (S < window)
                self._held.remove(held)
            else:
                if len(self._held) == self.window_groups:  # a whole group written at once (a prefill)
                    self._quantize_oldest(part.device)
                taken = {row for _, row, _ in self._held}
                row = next(r for r in range(0, self.window_groups * self.group_slots, self.group_slots) if r not in taken)
                held = [group, row, 0]
            self._held.append(held)
        held = self._held[-1]
        self.window.write(slice(held[1] + lo - start, held[1] + hi - start), part)
        held[2] = max(held[2], hi - start)
        # complete: the oldest group makes room at `seal`, once this step's attention has read it
        self._complete = part.device if hi == end else None

    def seal(self) -> None:
        """Make room for the next group once the newest is complete: the oldest group of a full
        window is quantized. The engine calls this when it stores a step's rows
        (engine/block_io.py), after the step's attention: attention over the cache in place and
        over a copy loaded before the step's write then read the same values."""
        if self._complete is not None and len(self._held) == self.window_groups:
            self._quantize_oldest(self._complete)
        self._complete = None

    def _quantize_oldest(self, device: torch.device) -> None:
        group, row, held = self._held.pop(0)
        self._quantize(group, self._window_rows(row, row + held, device))

    def _rewrite(self, group: int, lo: int, hi: int, start: int, part: torch.Tensor) -> None:
        held = self._find(group)
        if held is not None:
            _, row, n = held
            if lo < start + n:
                cut = min(hi, start + n)
                self.window.write(slice(row + lo - start, row + cut - start), part[: cut - lo])
            if hi <= start + n:
                return
            part, lo = part[max(0, start + n - lo) :], max(lo, start + n)
        if self.which == "v":
            self.quantized.write(slice(lo, hi), part)
            return
        slots = self._read_group(group, part.device)
        slots[lo - start : hi - start] = part
        self._quantize(group, slots)

    def _quantize(self, group: int, slots: torch.Tensor) -> None:
        """Slots (n, B, nkv, hd) of a whole group, quantized into its rows; slots the block's mask
        says hold no token are kept out of a channel's range."""
        start, end = self._bounds(group)
        if self.which == "v":
            self.quantized.write(slice(start, end), slots)
            return
        x = slots.float()
        if self.valid is not None:
            keep = self.valid[:, start:end].to(x.device).t()[:, :, None, None]  # (n, B, 1, 1)
            count = keep.sum(0)  # (B, 1, 1)
            mean = (x * keep).sum(0) / count.clamp(min=1)  # (B, nkv, hd)
            x = torch.where(keep, x, mean)
        if end - start < self.group_slots:  # the ring's last, shorter group: padded with its last slot
            x = torch.cat([x, x[-1:].expand(self.group_slots - (end - start), *x.shape[1:])])
        self.quantized.write(slice(group, group + 1), x.permute(1, 2, 3, 0).unsqueeze(0))  # (1, B, nkv, hd, G)

    # --- reads -------------------------------------------------------------------------------------
    def _segments(self, a: int, b: int) -> list[tuple[int, int, int | None]]:
        """[a, b) in order as (lo, hi, window row of lo, or None: quantized)."""
        out, at = [], a
        for start, stop, row in sorted(self.window_ranges()):
            lo, hi = max(at, start), min(b, stop)
            if lo < hi:
                if at < lo:
                    out.append((at, lo, None))
                out.append((lo, hi, row + lo - start))
                at = hi
        if at < b:
            out.append((at, b, None))
        return out

    def read_into(self, out: torch.Tensor, index: slice = _ALL, staging=None) -> torch.Tensor:
        """Slots `index` into out[:n] (out's device and dtype). `staging`: a QuantizedTensor of the
        quantized shape on out's device, for quantized parts that are not there."""
        a, b = _rows(index, self.shape[0])
        for lo, hi, row in self._segments(a, b):
            if row is None:
                self._read_quantized(out[lo - a : hi - a], lo, hi, staging)
            else:
                self._read_window(out[lo - a : hi - a], row, row + hi - lo)
        return out

    def whole_groups(self, a: int, b: int, fresh: slice) -> tuple[int, int]:
        """The groups [first, stop) of keys quantized whole in slots [a, b), before the window's
        groups and the slots `fresh` (a step's own, read as computed) where those lie in [a, b):
        `read_groups` reads them as stored."""
        G = self.group_slots
        first, stop = -(-a // G), min(b, self.shape[0] - self.shape[0] % G) // G  # not the ring's shorter group
        for lo, hi, _ in (*self.window_ranges(), (fresh.start, fresh.stop, None)):
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

    def _window_rows(self, i: int, j: int, device: torch.device) -> torch.Tensor:
        """The window's rows [i, j) on `device` (after every write queued to it)."""
        out = torch.empty((j - i, *self.shape[1:]), dtype=self.window.dtype, device=device)
        self._read_window(out, i, j)
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
        held, at = self._window_index(rows)
        if bool((~held).any()):
            out[(~held).to(device)] = self.quantized.read_rows(rows[~held], device, dtype)
        if bool(held.any()):
            out[held.to(device)] = self._window_rows(0, self.window.shape[0], device)[at[held].to(device)].to(dtype)
        return out

    def _window_index(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which positions the window holds (bool) and their window rows (0 where it holds none)."""
        held, at = torch.zeros_like(positions, dtype=torch.bool), torch.zeros_like(positions)
        for start, stop, row in self.window_ranges():
            inside = (positions >= start) & (positions < stop)
            held |= inside
            at = torch.where(inside, positions - start + row, at)
        return held, at

    def overlay_window(self, values: torch.Tensor, positions: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """Values (B, nh, k, hd) gathered from the quantized rows at positions (B, nh, k), with
        those the window holds read from it instead (no value read back to the host)."""
        if not self.window_ranges():
            return values
        B, nh, _ = positions.shape
        where = positions.device
        window = self._window_rows(0, self.window.shape[0], where)  # (rows, B, nkv, hd)
        held, at = self._window_index(positions)
        index = (at, torch.arange(B, device=where)[:, None, None],
                 (torch.arange(nh, device=where) // (nh // num_kv_heads))[None, :, None])
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
