"""Group-wise quantization: the config and the exact byte counts the memory planner needs.

Pure Python (no torch), so the planner can size a compressed tensor before anything exists.
`flexgen_dist.storage.quantize` takes its layout from `compressed_shapes` here, so the two can
never disagree.

Layout (FlexGen section 5: asymmetric min-max, groups of `group_size` values along
`group_dim`). A tensor of shape (rows, *rest) becomes three tensors that share the LEADING
dimension, so slicing rows of the compressed tensor is slicing rows of each of them:

    data   uint8    (rows, *other, num_groups * group_size * bits // 8)   packed codes
    scale  float16  (rows, *other, num_groups)
    mins   float16  (rows, *other, num_groups)

`other` is `rest` without the group dimension (the group dimension is moved last); each line
along the group dimension (a "vector") is padded up to `padded = num_groups * group_size`
values. With bits=4, byte j of a vector holds value j in its low nibble and value
j + padded/2 in its high nibble: unpacking writes two long contiguous halves instead of
interleaving nibbles, which is what makes dequantization fast on the CPU. Groups never span
rows, which is why the group dimension cannot be the leading one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError

SUPPORTED_BITS = (4, 8)
STAT_BYTES = 2  # scale and minimum are stored as float16


WEIGHT_METHODS = ("fitted", "minmax")
CACHE_METHODS = ("kivi", "minmax")


@dataclass(frozen=True)
class CompressionConfig:
    bits: int = 4
    """Bits per value: 4 (two values a byte) or 8 (one value a byte)."""
    group_size: int = 64
    """Values that share one scale and one minimum; the last group of a dimension is padded."""
    weight_method: str = "fitted"
    """How weights (quantized once, when written to their tier) choose each group's minimum and
    scale: "fitted" (the lowest squared error over clipped ranges and a least-squares step:
    storage/quantize_groups.py `fit_groups`) or "minmax" (round-to-nearest over the whole range, the
    paper's method, 10-20x faster to write). The KV cache, quantized every step, is always min-max."""
    cache_method: str = "kivi"
    """How the KV cache is quantized: "kivi" (KIVI, Liu et al., ICML 2024; storage/kivi.py): keys
    per channel, each channel over a group of `group_size` consecutive cache slots, values per
    token in groups of `group_size` along the head dimension, and the slots of the group still
    being filled kept in full precision until it is complete, then quantized once; or "minmax"
    (FlexGen's): the keys and values of every slot in groups along the head dimension, quantized
    as they are stored."""
    cache_window: int = 128
    """KIVI's full-precision window (its residual), in cache slots, rounded up to whole groups of
    `group_size` slots (`window_groups`): the newest slots, from one group less than the window
    to the window less one, are kept in the cache dtype; a group is quantized once the window is
    full and the newest group complete. At most one group: only the group being filled is kept
    (none right after a group completes)."""
    group_dim: int = -1
    """Dimension the groups run along (weights (out, in): the input dim, -1; KV cache
    (seq, batch, kv_heads, head_dim): the head dim, -1). Never the leading dimension (0): tier
    tensors are read and written by row ranges, and a group must not span rows."""

    def __post_init__(self):
        if not _is_int(self.bits) or self.bits not in SUPPORTED_BITS:
            raise UserError(
                f"CompressionConfig.bits={self.bits!r} is not supported: only 4 and 8 pack whole "
                "values into bytes (two 4-bit values or one 8-bit value a byte); use bits=4 or bits=8"
            )
        if not _is_int(self.group_size) or self.group_size <= 0:
            raise UserError(
                f"CompressionConfig.group_size={self.group_size!r} must be a positive integer "
                "(values sharing one scale and minimum; FlexGen uses 64)"
            )
        if self.bits == 4 and self.group_size % 2:
            raise UserError(
                f"CompressionConfig.group_size={self.group_size} must be even with bits=4: two "
                "values share a byte and a byte never straddles two groups; use e.g. 64"
            )
        if self.weight_method not in WEIGHT_METHODS:
            raise UserError(f"CompressionConfig.weight_method={self.weight_method!r} is not one of "
                            f"{', '.join(WEIGHT_METHODS)}")
        if self.cache_method not in CACHE_METHODS:
            raise UserError(f"CompressionConfig.cache_method={self.cache_method!r} is not one of "
                            f"{', '.join(CACHE_METHODS)}")
        if not _is_int(self.cache_window) or self.cache_window < 0:
            raise UserError(f"CompressionConfig.cache_window={self.cache_window!r} must be a whole number of cache "
                            "slots >= 0 (the newest slots kept in full precision; KIVI keeps 128)")
        if not _is_int(self.group_dim):
            raise UserError(f"CompressionConfig.group_dim={self.group_dim!r} must be an integer dimension index")
        if self.group_dim == 0:
            raise UserError(
                "CompressionConfig.group_dim=0 is the leading dimension, which tier tensors are "
                "sliced by, so groups along it would span rows; use -1 (the last dimension)"
            )

    @property
    def levels(self) -> int:
        """Largest code: codes run 0..levels, scale = (max - min) / levels."""
        return (1 << self.bits) - 1

    @property
    def window_groups(self) -> int:
        """KIVI's window in whole groups of slots (at least the group being filled)."""
        return max(1, -(-self.cache_window // self.group_size))

    @property
    def group_bytes(self) -> int:
        """Packed bytes of one group's codes."""
        return self.group_size * self.bits // 8

    def resolve_group_dim(self, ndim: int) -> int:
        """`group_dim` as a non-negative index for a tensor of `ndim` dims; refuses the leading dim."""
        if ndim < 2:
            raise UserError(
                f"cannot quantize a {ndim}-D tensor: its only dimension is the leading (row) one; "
                "keep 1-D tensors (biases, norms) uncompressed, as FlexGen does"
            )
        if not -ndim <= self.group_dim < ndim:
            raise UserError(
                f"CompressionConfig.group_dim={self.group_dim} is out of range for a {ndim}-D tensor; "
                f"use a dimension in 1..{ndim - 1} or -1"
            )
        group_dim = self.group_dim % ndim
        if group_dim == 0:
            raise UserError(
                f"CompressionConfig.group_dim={self.group_dim} is the leading dimension of a "
                f"{ndim}-D tensor; groups would span rows; use -1 (the last dimension)"
            )
        return group_dim


@dataclass(frozen=True)
class CompressedShapes:
    """Shapes of the three tensors of a compressed tensor (see the module docstring)."""

    data: tuple[int, ...]
    stats: tuple[int, ...]
    """Shape of `scale` and of `mins` (each float16)."""
    group_dim: int
    """The group dimension of the original shape, resolved to a non-negative index."""


@dataclass(frozen=True)
class RowBytes:
    """Bytes of one leading-dimension row of a compressed tensor, per part."""

    data: int
    scale: int
    mins: int

    @property
    def total(self) -> int:
        return self.data + self.scale + self.mins


def num_groups(dim_size: int, group_size: int) -> int:
    """Groups along a dimension of `dim_size` values; the last one is padded."""
    return -(-dim_size // group_size)


def compressed_shapes(shape: tuple[int, ...], config: CompressionConfig) -> CompressedShapes:
    shape = tuple(int(size) for size in shape)
    group_dim = config.resolve_group_dim(len(shape))
    other = shape[:group_dim] + shape[group_dim + 1 :]  # leading dim stays first: group_dim > 0
    groups = num_groups(shape[group_dim], config.group_size)
    return CompressedShapes(
        data=other + (groups * config.group_bytes,),
        stats=other + (groups,),
        group_dim=group_dim,
    )


def compressed_row_bytes(shape: tuple[int, ...], config: CompressionConfig) -> RowBytes:
    """Bytes of one row (one index of the leading dimension) of a compressed `shape`."""
    shapes = compressed_shapes(shape, config)
    stats_per_row = math.prod(shapes.stats[1:])
    return RowBytes(
        data=math.prod(shapes.data[1:]),
        scale=stats_per_row * STAT_BYTES,
        mins=stats_per_row * STAT_BYTES,
    )


def compressed_nbytes(shape: tuple[int, ...], config: CompressionConfig) -> int:
    """Total bytes of a compressed `shape`: packed codes plus float16 scales and minimums."""
    return int(shape[0]) * compressed_row_bytes(shape, config).total


def cache_quantized_shape(which: str, shape: tuple[int, ...], config: CompressionConfig) -> tuple[int, ...]:
    """The shape a compressed KV cache tensor (keys "k" or values "v", (S, B, nkv, hd)) is
    quantized as: itself (groups along the head dim), except KIVI's keys: a row per group of
    `group_size` slots, the group's slots last, (ceil(S / G), B, nkv, hd, G), quantized along
    them (each channel of the group one group; the ring's last group, when S % G, is padded)."""
    if config.cache_method == "minmax" or which == "v":
        return tuple(shape)
    seq, *rest = shape
    return (num_groups(seq, config.group_size), *rest, config.group_size)


def cache_window_shape(shape: tuple[int, ...], config: CompressionConfig) -> tuple[int, ...] | None:
    """KIVI's full-precision window of a cache tensor (S, B, nkv, hd): the slots of
    `window_groups` groups, a group's slots wherever it is held (one group of S < G slots:
    S slots); None for min-max."""
    if config.cache_method == "minmax":
        return None
    groups = min(config.window_groups, num_groups(shape[0], config.group_size))
    return (shape[0] if groups == 1 and shape[0] < config.group_size else groups * config.group_size, *shape[1:])


def compressed_cache_nbytes(which: str, shape: tuple[int, ...], config: CompressionConfig, window_itemsize: int) -> int:
    """Bytes of one compressed KV cache tensor as files: its quantized parts and, with KIVI, its
    window (`window_itemsize` bytes a value: the cache dtype)."""
    window = cache_window_shape(shape, config)
    extra = math.prod(window) * window_itemsize if window else 0
    return compressed_nbytes(cache_quantized_shape(which, shape, config), config) + extra


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
