"""What a decoder layer sees of one (layer, batch) KV cache: `write` this step's keys and values,
`attend` over every position written so far (model/decoder.py calls both).

- `DenseKV`: keys and values as (S, B, nkv, hd) tensors in the compute dtype where attention runs:
  the cache itself, or a scratch copy the engine loaded. Attention reads them in place (SDPA).
- `StoredKV`: the cache itself, read in place but stored otherwise: 16-bit on a CPU that computes
  in fp32, or quantized. It is converted piece by piece as attention reads it (a running
  softmax over chunks), never copied whole.

With `sparsity` < 1 (FlexGen's sparse attention), decoding reads every key but only the values of
the top `sparsity` fraction of past positions per head, from the tier where the value cache
lives (`values`): a disk cache is read at those rows only.
"""

from __future__ import annotations

import torch

from ..model.layers import attention, chunked_attention, sparse_attention
from ..storage.tiers import copy, read_rows, to_compute

_CHUNK = 256  # positions converted at a time by StoredKV


def _gather_values(source, positions: torch.Tensor, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """Values at positions (B, nh, k) of a (S, B, nkv, hd) value cache (a tensor or a tier
    tensor) -> (B, nh, k, hd) fp32: query head h reads kv head h // (nh // nkv)."""
    B, nh, k = positions.shape
    rows, where = torch.unique(positions.cpu(), return_inverse=True)  # sorted distinct positions
    block = source.index_select(0, rows.to(source.device)).float() if isinstance(source, torch.Tensor) \
        else read_rows(source, rows, device, torch.float32)  # (n, B, nkv, hd)
    batch = torch.arange(B)[:, None, None]
    head = (torch.arange(nh) // (nh // num_kv_heads))[None, :, None]
    return block[where.to(block.device), batch, head].to(device)  # (B, nh, k, hd)


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

    def attend(self, q: torch.Tensor, mask: torch.Tensor, scale: float, slots: slice) -> torch.Tensor:
        """Decode attention of q (B, nh, T, hd) over positions [0, slots.stop) -> (B, T, nh * hd)."""
        stop = slots.stop
        keys = self.k[:stop].permute(1, 2, 0, 3)  # (B, nkv, S, hd), a view
        if self.sparsity < 1:
            scores_of = lambda qg: qg.to(keys.device) @ keys.float().transpose(-1, -2)  # noqa: E731
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

    def _rows(self, tensor, start: int, stop: int) -> torch.Tensor:
        """Positions [start, stop) in fp32, (B, nkv, n, hd); this step's own rows as computed (as
        attention over a scratch copy sees them), not as stored."""
        rows = to_compute(tensor, slice(start, stop), self.attend_on, torch.float32).permute(1, 2, 0, 3)
        new = self._k_new if tensor is self.k else self._v_new
        lo, hi = max(start, self._slots.start), min(stop, self._slots.stop)
        if lo < hi:
            rows[:, :, lo - start : hi - start] = new[:, :, lo - self._slots.start : hi - self._slots.start].float()
        return rows

    def attend(self, q: torch.Tensor, mask: torch.Tensor, scale: float, slots: slice) -> torch.Tensor:
        stop = slots.stop
        q = q.to(self.attend_on)
        if self.sparsity < 1:
            def scores_of(qg):
                parts = [qg @ self._rows(self.k, a, min(stop, a + _CHUNK)).transpose(-1, -2) for a in range(0, stop, _CHUNK)]
                return torch.cat(parts, dim=-1)  # (B, nkv, g, S)

            num_kv_heads = self._v_new.shape[1]
            values_at = lambda pos: _gather_values(self.v, pos, num_kv_heads, self.attend_on)  # noqa: E731
            return sparse_attention(q, scores_of, stop, mask, scale, self.sparsity, values_at, self._v_new)
        read_kv = lambda a, b: (self._rows(self.k, a, b), self._rows(self.v, a, b))  # noqa: E731
        return chunked_attention(q, read_kv, stop, mask, scale, _CHUNK)
