"""A quantized tensor on a tier: its packed codes, scales and minimums as three tier tensors.

The three parts share the leading dimension (planning/compression.py), so a row range of the
compressed tensor is a row range of each part: a KV cache appends one quantized row per decode
step, and a disk tier reads row ranges of three files. Writes quantize; reads dequantize into a
tensor of the compute dtype. When the parts do not live in the memory that tensor is in (disk,
or host memory beside a GPU), they are first copied into `staging` (a QuantizedTensor there, from
the engine's slot), so only compressed bytes cross the link.
"""

from __future__ import annotations

import torch

from ..planning.compression import CompressionConfig
from ..planning.placement import Tier
from .quantize import QuantizedTensor, dequantize, empty_quantized, quantize, quantize_into
from .tiers import ALL, DiskTensor, MemoryTensor, _rows



class CompressedTensor:
    def __init__(self, data, scale, mins, shape: tuple[int, ...], config: CompressionConfig, tier: Tier):
        self.parts = (data, scale, mins)  # each a MemoryTensor or a DiskTensor
        self.shape = tuple(shape)
        self.config = config
        self.tier = tier

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def _memory(self, index: slice) -> QuantizedTensor | None:
        """Rows of the parts as a QuantizedTensor of views, when they are in memory."""
        if not all(isinstance(p, MemoryTensor) for p in self.parts):
            return None
        data, scale, mins = (p.data for p in self.parts)
        return QuantizedTensor(data, scale, mins, self.shape, torch.float32, self.config).rows(index)

    def write(self, index: slice, value: torch.Tensor) -> None:
        """Quantize `value` into rows `index`."""
        held = self._memory(ALL)
        if held is not None:
            quantize_into(held, index, value.to(held.device))
            return
        start, stop = _rows(index, self.shape[0])
        q = quantize(value.detach().to("cpu", torch.float32), self.config)
        for part, src in zip(self.parts, (q.data, q.scale, q.mins)):
            part.write(slice(start, stop), src)

    def read_into(self, out: torch.Tensor, index: slice = ALL, staging: QuantizedTensor | None = None) -> torch.Tensor:
        """Dequantize rows `index` into out[:rows] (out's device and dtype)."""
        start, stop = _rows(index, self.shape[0])
        rows = stop - start
        held = self._memory(slice(start, stop))
        if held is not None and held.device == out.device:
            dequantize(held, out=out[:rows])
            return out
        if staging is None:
            staging = empty_quantized((rows, *self.shape[1:]), self.config, out.device)
        else:
            staging = staging.rows(slice(0, rows))
        if held is not None:
            staging.copy_(held, non_blocking=True)
        else:
            for part, dst in zip(self.parts, (staging.data, staging.scale, staging.mins)):
                part.read_into(dst, slice(start, stop))
        dequantize(staging, out=out[:rows])
        return out


    def read_rows(self, rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows at sorted, distinct positions `rows` (sparse attention's values)."""
        from .tiers import read_rows

        shape = (len(rows), *self.shape[1:])
        data, scale, mins = (read_rows(part, rows, device, part.dtype) for part in self.parts)
        q = QuantizedTensor(data.contiguous(), scale.contiguous(), mins.contiguous(), shape, torch.float32, self.config)
        return dequantize(q, dtype=dtype)


def compressed_on_disk(base_path, shape, config: CompressionConfig, reader, create: bool = True) -> CompressedTensor:
    """Three files `<base>.data`, `<base>.scale`, `<base>.mins`."""
    probe = empty_quantized((1, *shape[1:]), config, "cpu")
    parts = []
    for suffix, like in (("data", probe.data), ("scale", probe.scale), ("mins", probe.mins)):
        part_shape = (shape[0], *like.shape[1:])
        parts.append(DiskTensor(f"{base_path}.{suffix}", part_shape, like.dtype, reader, create=create))
    return CompressedTensor(*parts, shape=shape, config=config, tier=Tier.DISK)


def compressed_in_memory(views: tuple[torch.Tensor, torch.Tensor, torch.Tensor], shape, config, tier: Tier) -> CompressedTensor:
    return CompressedTensor(*(MemoryTensor(v, tier) for v in views), shape=tuple(shape), config=config, tier=tier)
