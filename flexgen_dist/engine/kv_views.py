"""What a decoder layer sees of one (layer, batch) KV cache: `write` this step's keys and values,
`attend` over every position written so far (model/decoder.py calls both).

- `DenseKV`: keys and values as (S, B, nkv, hd) tensors in the compute dtype where attention runs:
  the cache itself, or a scratch copy the engine loaded. Attention reads them in place (SDPA).
- `StoredKV`: the cache itself, read in place but stored otherwise: 16-bit on a CPU that computes
  in fp32, or quantized (min-max, or KIVI's layout: storage/kivi.py, read a whole group of
  key slots a chunk where the chunk allows). It is converted piece by piece as attention reads
  it (a running softmax over chunks), never copied whole.

With `sparsity` < 1 (FlexGen's sparse attention), decoding reads every key but only the values of
the top `sparsity` fraction of past positions per head, from the tier where the value cache
lives (`values`): a disk cache is read at those rows only.

Keys that are not read in place by SDPA (a stored cache, sparse attention's scores) are read in
chunks of positions sized by planning/working.py, which counts one such chunk in the placement.
No step reads a value back to the host (a sync per layer on a GPU) unless the values it needs live
on another tier: positions chosen on the device gather values in device memory there.
"""

from __future__ import annotations

import torch

from ..model.layers import attention, chunked_attention, sparse_attention
from ..planning.working import attention_chunk_positions
from ..storage.tiers import MemoryTensor, copy, layout_of, read_rows, to_compute


def _chunk(q: torch.Tensor, kv_dim: int, device: torch.device, align: int = 1) -> int:
    """Positions per chunk for queries q (B, nh, T, hd) over keys of kv_dim on `device`, a
    multiple of `align`."""
    B, nh, T, _ = q.shape
    return attention_chunk_positions(batch=B, kv_dim=kv_dim, num_heads=nh, queries=T, on_gpu=device.type == "cuda",
                                     align=align)


def _scores_in_chunks(qg: torch.Tensor, scores_of, stop: int, chunk: int) -> torch.Tensor:
    """Raw scores (B, nkv, g, stop) of grouped fp32 queries qg (B, nkv, g, hd) over keys read a
    chunk of positions at a time: scores_of(qg, a, b) -> (B, nkv, g, b - a)."""
    return torch.cat([scores_of(qg, a, min(stop, a + chunk)) for a in range(0, stop, chunk)], dim=-1)


def _gather_values(source, positions: torch.Tensor, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """Values at positions (B, nh, k) of a (S, B, nkv, hd) value cache (a tensor or a tier
    tensor) -> (B, nh, k, hd) fp32: query head h reads kv head h // (nh // nkv).

    A cache in the memory the positions are in is gathered there, no value read back to the host.
    Elsewhere (host memory beside a GPU, a file) the host reads the distinct positions only: one
    sync, and only the rows used cross the link."""
    B, nh, k = positions.shape
    if layout_of(source) == "kivi":  # the quantized slots, then those still in the window
        values = _gather_values(source.quantized, positions, num_kv_heads, positions.device)
        return source.overlay_window(values, positions, num_kv_heads).to(device)
    memory = _in_memory(source)
    if memory is not None and memory[0].device == positions.device:
        where = positions.device
        index = (positions, torch.arange(B, device=where)[:, None, None],
                 (torch.arange(nh, device=where) // (nh // num_kv_heads))[None, :, None])
        if len(memory) == 1:
            return memory[0][index].float().to(device)  # (B, nh, k, hd)
        from ..storage.quantize import QuantizedTensor, dequantize  # only a compressed cache comes here

        data, scale, mins = (part[index].reshape(B * nh * k, -1) for part in memory)  # a (position, head) a row
        gathered = QuantizedTensor(data, scale, mins, (B * nh * k, source.shape[-1]), torch.float32, source.config)
        return dequantize(gathered).reshape(B, nh, k, -1).to(device)  # (B, nh, k, hd)
    rows, where = torch.unique(positions.cpu(), return_inverse=True)  # sorted distinct positions
    block = source.index_select(0, rows.to(source.device)).float() if isinstance(source, torch.Tensor) \
        else read_rows(source, rows, device, torch.float32)  # (n, B, nkv, hd)
    batch = torch.arange(B, device=block.device)[:, None, None]
    head = (torch.arange(nh, device=block.device) // (nh // num_kv_heads))[None, :, None]
    return block[where.to(block.device), batch, head].to(device)  # (B, nh, k, hd)


def _in_memory(source) -> tuple[torch.Tensor, ...] | None:
    """The tensor(s) holding a cache in memory: (values,), or (data, scale, mins) of a cache
    quantized along its last dimension; None for a file (or anything else read through its tier)."""
    if isinstance(source, torch.Tensor):
        return (source,)
    if isinstance(source, MemoryTensor):
        return (source.data,)
    if layout_of(source) == "groups" and all(isinstance(p, MemoryTensor) for p in source.parts) \
            and source.config.resolve_group_dim(len(source.shape)) == len(source.shape) - 1:
        return tuple(p.data for p in source.parts)
    return None


def slot_runs(slots: torch.Tensor) -> list[tuple[int, int, int]]:
    """Slots (T,) in order, consecutive except where they wrap round the cache -> runs of
    (start, stop, offset in slots)."""
    values = slots.tolist()
    runs, begin = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append((values[begin], values[i - 1] + 1, begin))
            begin = i
    return runs


class DenseKV:
    def __init__(self, k: torch.Tensor, v: torch.Tensor, attend_on: torch.device, sparsity: float = 1.0, values=None):
        self.k, self.v = k, v  # (S, B, nkv, hd)
        self.attend_on = attend_on  # the compute device, or the CPU over a host cache (CPU attention)
        self.sparsity = sparsity
        self.values = values if values is not None else v  # where sparse attention reads values
        self._v_new = None

    def write(self, slots: slice, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """This step's rows, k_new and v_new (B, nkv, T, hd), into slots `slots`."""
        self.k[slots] = k_new.permute(2, 0, 1, 3)  # (T, B, nkv, hd): only the new rows move
        self.v[slots] = v_new.permute(2, 0, 1, 3)
        self._v_new = v_new

    def write_rows(self, rows: torch.Tensor, slots: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Keys and values (R, nkv, T, hd) of batch rows `rows` into cache slots `slots` (T,)."""
        at = (slots.to(self.k.device)[:, None], rows.to(self.k.device)[None, :])
        self.k[at] = k_new.permute(2, 0, 1, 3).to(self.k.dtype)  # (T, R, nkv, hd)
        self.v[at] = v_new.permute(2, 0, 1, 3).to(self.v.dtype)

    def attend(self, q: torch.Tensor, mask: torch.Tensor, scale: float, slots: slice) -> torch.Tensor:
        """Decode attention of q (B, nh, T, hd) over positions [0, slots.stop) -> (B, T, nh * hd)."""
        stop = slots.stop
        keys = self.k[:stop].permute(1, 2, 0, 3)  # (B, nkv, S, hd), a view
        if self.sparsity < 1:
            # fp32 keys a chunk at a time: never an fp32 copy of the whole key cache
            chunk = _chunk(q, keys.shape[1] * keys.shape[3], keys.device)
            in_chunk = lambda qg, a, b: qg @ keys[:, :, a:b].float().transpose(-1, -2)  # noqa: E731
            scores_of = lambda qg: _scores_in_chunks(qg.to(keys.device), in_chunk, stop, chunk)  # noqa: E731
            values_at = lambda pos: _gather_values(self.values, pos, keys.shape[1], keys.device)  # noqa: E731
            return sparse_attention(q, scores_of, stop, mask, scale, self.sparsity, values_at, self._v_new)
        values = self.v[:stop].permute(1, 2, 0, 3)
        return attention(q.to(self.attend_on, keys.dtype), keys, values, mask.to(self.attend_on), scale)


class StoredKV:
    def __init__(self, k, v, attend_on: torch.device, sparsity: float = 1.0):
        self.k, self.v = k, v  # tier tensors in memory: 16-bit MemoryTensors or CompressedTensors
        self.attend_on = attend_on
        self.sparsity = sparsity
        self._v_new = None

    def write(self, slots: slice, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        copy(self.k, slots, k_new.permute(2, 0, 1, 3))  # converted or quantized on the way in
        copy(self.v, slots, v_new.permute(2, 0, 1, 3))
        self._slots, self._k_new, self._v_new = slots, k_new, v_new

    def write_rows(self, rows: torch.Tensor, slots: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Keys and values (R, nkv, T, hd) of batch rows `rows` into cache slots `slots` (T,): each
        run of slots is read, its rows replaced and written back (converted or quantized again:
        exact for a 16-bit cache, within the quantization's own error for a compressed one)."""
        for tensor, new in ((self.k, k_new), (self.v, v_new)):
            new = new.permute(2, 0, 1, 3)  # (T, R, nkv, hd)
            for start, stop, offset in slot_runs(slots):
                part = to_compute(tensor, slice(start, stop), new.device, torch.float32).clone()  # (n, B, nkv, hd)
                part[:, rows.to(part.device)] = new[offset:offset + stop - start].float()
                copy(tensor, slice(start, stop), part)

    def _rows(self, tensor, start: int, stop: int) -> torch.Tensor:
        """Positions [start, stop) in fp32, (B, nkv, n, hd); this step's own rows as computed (as
        attention over a scratch copy sees them), not as stored."""
        rows = to_compute(tensor, slice(start, stop), self.attend_on, torch.float32).permute(1, 2, 0, 3)
        new = self._k_new if tensor is self.k else self._v_new
        lo, hi = max(start, self._slots.start), min(stop, self._slots.stop)
        if lo < hi:
            rows[:, :, lo - start : hi - start] = new[:, :, lo - self._slots.start : hi - self._slots.start].float()
        return rows

    def _scores(self, qg: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Raw scores (B, nkv, g, b - a) of grouped fp32 queries (B, nkv, g, hd) over keys [a, b).
        KIVI's whole groups of keys are read as stored, (n, B, nkv, hd, G), and multiplied so: a
        (B, nkv, G, hd) view of them would cost a transposing copy of every key."""
        dense = lambda lo, hi: qg @ self._rows(self.k, lo, hi).transpose(-1, -2)  # noqa: E731
        if layout_of(self.k) != "kivi":
            return dense(a, b)
        first, stop = self.k.whole_groups(a, b, self._slots)
        if first == stop:
            return dense(a, b)
        lo, hi = first * self.k.group_slots, stop * self.k.group_slots
        keys = self.k.read_groups(first, stop, self.attend_on)  # (n, B, nkv, hd, G)
        parts = [torch.matmul(qg, keys).permute(1, 2, 3, 0, 4).flatten(3)]  # (n, B, nkv, g, G) -> (B, nkv, g, n * G)
        if a < lo:
            parts.insert(0, dense(a, lo))
        if hi < b:
            parts.append(dense(hi, b))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def attend(self, q: torch.Tensor, mask: torch.Tensor, scale: float, slots: slice) -> torch.Tensor:
        stop = slots.stop
        q = q.to(self.attend_on)
        _, num_kv_heads, _, head_dim = self._k_new.shape
        align = self.k.group_slots if layout_of(self.k) == "kivi" else 1  # whole groups of KIVI's keys a chunk
        chunk = _chunk(q, num_kv_heads * head_dim, self.attend_on, align)
        if self.sparsity < 1:
            scores_of = lambda qg: _scores_in_chunks(qg, self._scores, stop, chunk)  # noqa: E731
            values_at = lambda pos: _gather_values(self.v, pos, num_kv_heads, self.attend_on)  # noqa: E731
            return sparse_attention(q, scores_of, stop, mask, scale, self.sparsity, values_at, self._v_new)
        keys = lambda a, b: lambda qg: self._scores(qg, a, b)  # noqa: E731
        read_kv = lambda a, b: (keys(a, b), self._rows(self.v, a, b))  # noqa: E731
        return chunked_attention(q, read_kv, stop, mask, scale, chunk)
