"""The tiers, dtype sizes, and how tensors are laid out in flat buffers (pure Python, no torch)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .compression import CompressionConfig, cache_quantized_shape, cache_window_shape, compressed_shapes

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}
READ_ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffer addresses aligned to this
SLOT_ALIGN = 256  # bytes: every piece of a slot starts on a multiple of this
ATTENTION_QUERY_CHUNK = 1024  # queries per prefill attention call (model/layers.py): bounds its scores


class Tier(enum.Enum):
    GPU = "gpu"  # the compute device (host memory on a machine without a GPU)
    CPU = "cpu"  # host memory (pinned where a GPU makes that pay)
    DISK = "disk"  # files in the offload folder

    def __str__(self) -> str:
        return self.value


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPE_BYTES)}") from None


def choose_tiers(sizes: list[int], percents: tuple[float, float, float]) -> list[Tier]:
    """Tier of each tensor, splitting a list of tensors by cumulative size (FlexGen's rule).

    A tensor goes to the tier whose percentage range holds the midpoint of its cumulative size,
    so gpu gets about `percents[0]` % of the bytes, cpu the next `percents[1]` %, disk the rest."""
    total = sum(sizes)
    if total == 0:
        return [Tier.GPU] * len(sizes)
    gpu_end, cpu_end = percents[0], percents[0] + percents[1]
    tiers, acc = [], 0
    for size in sizes:
        mid = (acc + size / 2) / total * 100
        acc += size
        tiers.append(Tier.GPU if mid < gpu_end else Tier.CPU if mid < cpu_end else Tier.DISK)
    return tiers


@dataclass(frozen=True)
class SlotPiece:
    """A tensor view carved out of a flat byte slot."""

    name: str  # the weight's name (or "k" / "v" in a KV scratch pair)
    part: str  # "value" (in the compute dtype, what layers read), or a compressed part: "data", "scale", "mins"
    offset: int  # bytes from the slot's start
    shape: tuple[int, ...]
    dtype: str


def compressed_parts(name: str, shape: tuple[int, ...], config: CompressionConfig) -> list[tuple[str, str, tuple[int, ...], str]]:
    shapes = compressed_shapes(shape, config)
    return [(name, "data", shapes.data, "uint8"), (name, "scale", shapes.stats, "float16"), (name, "mins", shapes.stats, "float16")]


def cache_parts(name: str, which: str, shape: tuple[int, ...], config: CompressionConfig,
                window_dtype: str) -> list[tuple[str, str, tuple[int, ...], str]]:
    """The pieces of one compressed KV cache tensor (keys "k" or values "v", (S, B, nkv, hd)): its
    quantized parts (planning/compression.py `cache_quantized_shape`) and, with KIVI, its
    full-precision window (part "window", in `window_dtype`)."""
    pieces = compressed_parts(name, cache_quantized_shape(which, shape, config), config)
    window = cache_window_shape(shape, config)
    if window is not None:
        pieces.append((name, "window", window, window_dtype))
    return pieces


def cache_part_rows(part: str, which: str, rows: int, config: CompressionConfig) -> int:
    """Leading rows of a piece of a compressed cache tensor of `rows` slots (a block shorter than
    the workload uses the first rows of each piece)."""
    shape = (rows, 1, 1, 1)
    if part == "window":
        return cache_window_shape(shape, config)[0]
    return cache_quantized_shape(which, shape, config)[0]


def pack(pieces: list[tuple[str, str, tuple[int, ...], str]]) -> tuple[tuple[SlotPiece, ...], int]:
    """Lay pieces (name, part, shape, dtype) out one after another, each start aligned; returns the
    pieces with their offsets and the slot's length in bytes."""
    out, end = [], 0
    for name, part, shape, dtype in pieces:
        out.append(SlotPiece(name, part, end, tuple(shape), dtype))
        end += piece_bytes(shape, dtype)
    return tuple(out), end


def piece_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """What one piece takes in a slot: its bytes, rounded up to the alignment of the next one."""
    return -(-math.prod(shape) * dtype_bytes(dtype) // SLOT_ALIGN) * SLOT_ALIGN




def slot_bytes(layout: tuple[SlotPiece, ...]) -> int:
    """The length of a slot laid out by `pack` (its last piece's end, aligned)."""
    if not layout:
        return 0
    last = layout[-1]
    return pack([(last.name, last.part, last.shape, last.dtype)])[1] + last.offset
