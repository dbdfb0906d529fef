"""Group-wise asymmetric min-max quantization of weights and KV cache (FlexGen section 5).

Per group of `group_size` values along `group_dim`:
    scale = (max - min) / (2**bits - 1),   code = clamp(round((x - min) / scale), 0, 2**bits - 1)
and x is recovered as min + code * scale. Scale and minimum are stored in float16: the minimum
is rounded DOWN and the scale UP to a float16 value, so [min, min + levels * scale] still
covers the group and every element's error stays within scale / 2 (the stored scale). A
constant group gets scale 0 and dequantizes to its minimum (exactly the constant when that is
a float16 value; never NaN or inf). Values beyond +-65376 are clamped to it: that is the
float16 range less the 128 by which rounding a scale up can raise a group's top value, so the
values still fit float16 after the round trip.

The layout (`flexgen_dist.planning.compression`) keeps the leading dimension row-addressable:
the packed codes, the scales and the minimums share it, `QuantizedTensor.rows(a:b)` is a view of
rows a..b of each, and `quantize_into(dst, a:b, x)` writes exactly the bytes that quantizing the
whole tensor would put there (a group never spans rows). So a KV cache can append one token's
row per decode step, and a disk tier can read a row range of each part.

Arithmetic is fp32 whatever the stored dtype (fp16 arithmetic on AVX2 CPUs is slow). The work
goes in chunks of whole rows: on the CPU chunks that fit in the L2 cache (dequantization makes
four passes, two nibble copies, a multiply, an add, and those passes then hit the cache instead
of memory); everywhere at most DEQUANTIZE_CHUNK_VALUES values (planning/working.py), so the fp32
temporaries of a dequantization are bounded whatever the tensor's size, and the planner counts them.

Nothing here reads a value back to the host (on a GPU, a sync per call): a NaN is not refused
when quantized but kept (its group dequantizes to NaN), for the engine's check of each layer's
output to report; a checkpoint's weights are checked for NaN when they are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..planning.compression import CompressionConfig, compressed_shapes
from ..planning.placement import Tier
from ..planning.working import DEQUANTIZE_CHUNK_VALUES
from .quantize_groups import dequantize_vectors, fit_groups, pack, quantize_vectors
from .tiers import ALL, DiskTensor, MemoryTensor, _rows

# Values per chunk and per thread: ~1 MiB of fp32, half an L2 cache of the development CPUs;
# measured 2.0x the cost of a plain fp16->fp32 copy, against 2.8x for one pass over 16 MiB.
_CHUNK_VALUES_PER_THREAD = 1 << 18
# Quantization is off the hot path: bigger chunks, but bounded so fp32 temporaries of a large
# weight never cost more than a few tens of MiB.
_QUANTIZE_CHUNK_VALUES = 1 << 22


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized tensor: three tensors sharing the leading dimension of `shape`."""

    data: torch.Tensor
    """uint8 packed codes, (rows, *other, padded * bits // 8)."""
    scale: torch.Tensor
    """float16, (rows, *other, num_groups)."""
    mins: torch.Tensor
    """float16, (rows, *other, num_groups)."""
    shape: tuple[int, ...]
    """Shape of the original tensor."""
    dtype: torch.dtype
    """Dtype of the original tensor (what `dequantize` gives back by default is fp32)."""
    config: CompressionConfig

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(size) for size in self.shape))
        shapes = compressed_shapes(self.shape, self.config)
        parts = (
            ("data", self.data, torch.uint8, shapes.data),
            ("scale", self.scale, torch.float16, shapes.stats),
            ("mins", self.mins, torch.float16, shapes.stats),
        )
        for name, part, dtype, shape in parts:
            if part.dtype != dtype or tuple(part.shape) != shape or not part.is_contiguous():
                raise ValueError(
                    f"QuantizedTensor.{name} must be a contiguous {dtype} tensor of shape {shape} for "
                    f"shape {self.shape} and {self.config}; got {part.dtype} {tuple(part.shape)}"
                )

    @property
    def group_dim(self) -> int:
        return self.config.resolve_group_dim(len(self.shape))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return sum(part.numel() * part.element_size() for part in (self.data, self.scale, self.mins))

    def rows(self, index: slice) -> "QuantizedTensor":
        """Rows `index` (a contiguous slice of the leading dimension) as views: no copy."""
        start, stop = _row_range(index, self.shape[0])
        return QuantizedTensor(
            data=self.data[start:stop], scale=self.scale[start:stop], mins=self.mins[start:stop],
            shape=(stop - start,) + self.shape[1:], dtype=self.dtype, config=self.config,
        )

    def copy_(self, src: "QuantizedTensor", non_blocking: bool = False) -> None:
        """Copy `src` (same shape and config; any device) into this tensor's storage."""
        if src.shape != self.shape or src.config != self.config:
            raise ValueError(
                f"cannot copy a quantized {src.shape} {src.config} into {self.shape} {self.config}"
            )
        for dst_part, src_part in ((self.data, src.data), (self.scale, src.scale), (self.mins, src.mins)):
            dst_part.copy_(src_part, non_blocking=non_blocking)


def empty_quantized(
    shape: tuple[int, ...], config: CompressionConfig, device: torch.device | str = "cpu",
    pin: bool = False, dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """Uninitialised storage for a quantized `shape` (pinned when `pin` and CUDA is there)."""
    device = torch.device(device)
    shapes = compressed_shapes(tuple(shape), config)
    pin = pin and device.type == "cpu" and torch.cuda.is_available()
    return QuantizedTensor(
        data=torch.empty(shapes.data, dtype=torch.uint8, device=device, pin_memory=pin),
        scale=torch.empty(shapes.stats, dtype=torch.float16, device=device, pin_memory=pin),
        mins=torch.empty(shapes.stats, dtype=torch.float16, device=device, pin_memory=pin),
        shape=tuple(shape), dtype=dtype, config=config,
    )


def quantize(x: torch.Tensor, config: CompressionConfig, *, fitted: bool = False) -> QuantizedTensor:
    """Quantize `x` (any float dtype, at least 2-D) into new storage on `x`'s device. `fitted`:
    each group's minimum and scale chosen to minimise its error (quantize_groups.py `fit_groups`:
    many passes, for weights written once to their tier), else min-max round-to-nearest (one
    pass: the KV cache)."""
    dst = empty_quantized(tuple(x.shape), config, x.device, dtype=x.dtype)
    quantize_into(dst, slice(None), x, fitted=fitted)
    return dst


def quantize_into(dst: QuantizedTensor, rows: slice, x: torch.Tensor, *, fitted: bool = False) -> None:
    """Quantize `x` into rows `rows` of `dst` in place (e.g. append a token's KV row).

    `x` has shape (rows, *dst.shape[1:]); it is quantized on its own device and the codes are
    copied to `dst`'s. The result is bit for bit what `quantize` of the whole tensor holds there.
    """
    start, stop = _row_range(rows, dst.shape[0])
    expected = (stop - start,) + dst.shape[1:]
    if tuple(x.shape) != expected:
        raise ValueError(
            f"quantize_into rows {start}:{stop} of {dst.shape} needs shape {expected}, got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"quantize needs a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        return
    config = dst.config
    x_moved = x.movedim(dst.group_dim, -1)  # (rows, *other, dim): a view
    dim_size = x_moved.shape[-1]
    padded = dst.scale.shape[-1] * config.group_size
    chunk_rows = _chunk_rows(x_moved, padded, _QUANTIZE_CHUNK_VALUES)
    for chunk_start in range(0, stop - start, chunk_rows):
        chunk_stop = min(stop - start, chunk_start + chunk_rows)
        source = x_moved[chunk_start:chunk_stop]
        values = torch.empty(source.shape[:-1] + (padded,), dtype=torch.float32, device=x.device)
        values[..., :dim_size].copy_(source)
        # Pad with the vector's last value: it is inside the last group's range, so the padding
        # changes neither its minimum nor its maximum.
        values[..., dim_size:].copy_(source[..., dim_size - 1 :].expand(*source.shape[:-1], padded - dim_size))
        quantizer = fit_groups if fitted else quantize_vectors
        codes, scale, mins = quantizer(values.view(-1, padded), config)  # (n, padded), (n, groups) x2
        target = dst.rows(slice(start + chunk_start, start + chunk_stop))
        target.data.view(-1, target.data.shape[-1]).copy_(pack(codes, config.bits))
        target.scale.view(-1, target.scale.shape[-1]).copy_(scale)
        target.mins.view(-1, target.mins.shape[-1]).copy_(mins)


def dequantize(
    q: QuantizedTensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The values of `q` as a `dtype` tensor of `q.shape` on `q`'s device.

    With `out` (shape `q.shape`, on `q`'s device; its dtype wins over `dtype`) the values are
    written there and `out` is returned: the engine dequantizes into pooled buffers. Rows go in
    chunks of at most DEQUANTIZE_CHUNK_VALUES values (at least one row). A contiguous fp32 `out`
    grouped along its last dimension, with no padding (weights and KV caches whose dims are
    multiples of the group size) is written in place; the only temporaries are the chunk's
    scales and minimums in fp32 and a chunk of nibbles. Otherwise each chunk goes through one
    fp32 scratch chunk and is copied into `out` (the case of a 16-bit `out` on a GPU).
    """
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    elif tuple(out.shape) != q.shape or out.device != q.device:
        raise ValueError(
            f"dequantize out must have shape {q.shape} on {q.device}; got {tuple(out.shape)} on {out.device}"
        )
    if out.numel() == 0:
        return out
    config = q.config
    out_moved = out.movedim(q.group_dim, -1)  # (rows, *other, dim): a view
    other, dim_size = tuple(out_moved.shape[1:-1]), out_moved.shape[-1]
    padded = q.scale.shape[-1] * config.group_size
    direct = out.dtype == torch.float32 and out_moved.is_contiguous() and dim_size == padded
    budget = DEQUANTIZE_CHUNK_VALUES
    if q.device.type == "cpu":
        budget = min(budget, _CHUNK_VALUES_PER_THREAD * torch.get_num_threads())
    chunk_rows = min(q.shape[0], _chunk_rows(out_moved, padded, budget))
    rows_shape = (q.shape[0], -1)
    scale = q.scale.view(rows_shape)  # (rows, vectors_per_row * num_groups), float16
    mins = q.mins.view(rows_shape)
    data = q.data.view(rows_shape)  # (rows, vectors_per_row * packed bytes)
    scratch = None
    for start in range(0, q.shape[0], chunk_rows):
        stop = min(q.shape[0], start + chunk_rows)
        if direct:
            values = out_moved[start:stop].view(-1, padded)
        else:
            if scratch is None:
                scratch = torch.empty((chunk_rows, *other, padded), dtype=torch.float32, device=q.device)
            values = scratch[: stop - start].view(-1, padded)
        # the chunk's statistics in fp32 (1/group_size of its values each)
        dequantize_vectors(data[start:stop], scale[start:stop].float(), mins[start:stop].float(), values, config)
        if not direct:
            out_moved[start:stop].copy_(values.view(stop - start, *other, padded)[..., :dim_size])
    return out


def _chunk_rows(moved: torch.Tensor, padded: int, budget_values: int) -> int:
    """Leading rows per chunk so a chunk holds about `budget_values` padded values (at least 1)."""
    values_per_row = padded
    for size in moved.shape[1:-1]:
        values_per_row *= size
    return max(1, budget_values // max(1, values_per_row))


def _row_range(index: slice, length: int) -> tuple[int, int]:
    if not isinstance(index, slice):
        raise TypeError(f"quantized tensors are indexed by a slice of the leading dimension, got {index!r}")
    start, stop, step = index.indices(length)
    if step != 1:
        raise ValueError("quantized tensors are indexed by a contiguous slice of the leading dimension")
    return start, max(start, stop)


# --- A quantized tensor on a tier: its packed codes, scales and minimums as three tier tensors.
# 
# The three parts share the leading dimension (planning/compression.py), so a row range of the
# compressed tensor is a row range of each part: a KV cache appends one quantized row per decode
# step, and a disk tier reads row ranges of three files. Writes quantize; reads dequantize into a
# tensor of the compute dtype. When the parts do not live in the memory that tensor is in (disk,
# or host memory beside a GPU), they are first copied into `staging` (a QuantizedTensor there, from
# the engine's slot), so only compressed bytes cross the link.

class CompressedTensor:
    LAYOUT = "groups"

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
