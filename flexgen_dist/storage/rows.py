"""Weights that are never loaded whole into a slot (planning/place.py sizes the slot to one
decoder layer):

- `RowTable`: an embedding table read where it lives, only the rows of a step's tokens: a gather
  from memory, a read of those rows from a file (each run of consecutive ids one read), or the
  dequantization of just those rows of a compressed table.
- `StreamedRows`: the head's output projection when it is larger than the slot: its rows pass
  through one slot piece a chunk at a time.

The layer math (model/layers.py `embedding`, `logits`) takes either of these or a plain tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .tiers import MemoryTensor, copy, read_rows

if TYPE_CHECKING:
    from .quantize import QuantizedTensor


class RowTable:
    """Rows of a tier tensor (tokens x width), gathered on the compute device in its dtype."""

    def __init__(self, src, device: torch.device, dtype: torch.dtype):
        self.src = src  # MemoryTensor, DiskTensor or CompressedTensor
        self.device = device
        self.dtype = dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.src.shape)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> rows (B, T, width): F.embedding's result, reading only those rows."""
        flat = ids.reshape(-1)  # (B * T,)
        if isinstance(self.src, MemoryTensor):
            rows = self.src.data.index_select(0, flat.to(self.src.data.device))
        else:  # a file, or compressed parts: each distinct row read (and dequantized) once
            unique, inverse = torch.unique(flat.cpu(), sorted=True, return_inverse=True)
            rows = read_rows(self.src, unique, self.device, self.dtype)[inverse.to(self.device)]
        return rows.to(self.device, self.dtype).reshape(*ids.shape, -1)  # (B, T, width)


class StreamedRows:
    """A (rows, width) weight read `len(buffer)` rows at a time into `buffer` (a slot piece in
    the compute dtype; `staging` for compressed bytes that must first move to the device).

    `chunks()` yields every chunk once. The chunk the buffer holds is used first and the others
    follow in the order that ends at the far end, so the next call (the next GPU batch) starts
    with the chunk left in the buffer: one chunk fewer to read per batch."""

    def __init__(self, src, buffer: torch.Tensor, staging: QuantizedTensor | None, held: int | None = None):
        self.src = src
        self.buffer = buffer  # (chunk rows, width)
        self.staging = staging
        self.held = held  # the chunk in the buffer (None: none yet)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.src.shape)

    @property
    def num_chunks(self) -> int:
        return -(-self.src.shape[0] // self.buffer.shape[0])

    def fill(self, chunk: int) -> torch.Tensor:
        """Read chunk `chunk` into the buffer; returns its rows there."""
        size = self.buffer.shape[0]
        start, stop = chunk * size, min(self.src.shape[0], (chunk + 1) * size)
        if self.held != chunk:
            copy(self.buffer[: stop - start], slice(None), self.src, slice(start, stop), self.staging)
            self.held = chunk
        return self.buffer[: stop - start]

    def chunks(self):
        """(start row, stop row, the rows on the device) of every chunk."""
        n, size = self.num_chunks, self.buffer.shape[0]
        order = range(n - 1, -1, -1) if self.held == n - 1 and n > 1 else range(n)
        for chunk in order:
            rows = self.fill(chunk)
            yield chunk * size, chunk * size + rows.shape[0], rows
