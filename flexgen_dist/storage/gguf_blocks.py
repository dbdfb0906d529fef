"""A GGUF tensor's bytes as a tensor: Q4_0, Q4_1 and Q8_0 blocks as this runtime's quantized groups
exactly, plain values as they are stored, any other type dequantized by the gguf package.

A GGUF row of `cols` values is cols / 32 blocks, each an fp16 scale d (Q4_1: then an fp16 minimum m)
and 32 codes; a 4-bit block's byte j holds value j in its low nibble and value j + 16 in its high one:

    Q8_0  34 bytes: d, 32 int8 q              value = d * q
    Q4_0  18 bytes: d, 16 bytes of nibbles q  value = d * (q - 8)
    Q4_1  20 bytes: d, m, 16 bytes of q       value = d * q + m

Our groups (planning/compression.py) hold value = code * scale + min, computed in fp32 from a float16
scale and minimum (quantize_groups.py `dequantize_vectors`), so a block is a group of 32 with

    Q8_0  code = q + 128, scale = d, min = -128 d
    Q4_0  code = q,       scale = d, min = -8 d
    Q4_1  code = q,       scale = d, min = m

and each value is bit for bit the fp32 value of gguf's `dequantize` (what transformers loads): d * code
is exact in fp32 (11 by at most 8 significant bits); -128 d and -8 d are exact in float16 (a power-of-
two multiple; a scale so large that it overflows is refused); for Q8_0 and Q4_0 the sum is d * q,
which fp32 holds exactly, and for Q4_1 the one rounding of d * q + m is gguf's own.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..planning.compression import CompressionConfig
from .quantize import QuantizedTensor
from .quantize_groups import pack

GROUP_SIZE = 32
# ggml type id -> (name, bits, bytes per block of GROUP_SIZE values, offset of the codes in a block)
KEPT = {2: ("Q4_0", 4, 18, 2), 3: ("Q4_1", 4, 20, 4), 8: ("Q8_0", 8, 34, 2)}
_FLOAT = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # ggml type ids of plain values


def to_groups(raw: torch.Tensor, ggml_type: int, shape: tuple[int, int], config: CompressionConfig,
              where: str) -> QuantizedTensor:
    """The (rows, bytes per row) uint8 blocks `raw` of a Q4_0, Q4_1 or Q8_0 tensor of `shape` as a
    QuantizedTensor of `config` (its bits, groups of 32 along the rows); `where` names the tensor."""
    name, bits, block_bytes, start = KEPT[ggml_type]
    if (config.bits, config.group_size) != (bits, GROUP_SIZE):
        raise ValueError(f"{name} blocks are {bits}-bit groups of {GROUP_SIZE}, not {config}")
    rows, cols = shape
    blocks = raw.reshape(rows, cols // GROUP_SIZE, block_bytes)  # (rows, groups, block bytes)
    scale = _half(blocks, 0)  # (rows, groups) float16
    qs = blocks[..., start:]  # (rows, groups, 32 or 16)
    if bits == 8:
        codes = qs ^ 0x80  # the int8 q's byte with its top bit flipped is the uint8 q + 128
    else:
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # (rows, groups, 32): values j, then j + 16
    scale32 = scale.float()  # (fp16 arithmetic is slow on CPUs)
    if not bool(torch.isfinite(scale32).all()):
        raise UserError(f"{where} ({name}) has block scales that are NaN or Inf: the file is corrupt; download it "
                        "again")
    if ggml_type == 3:
        mins = _half(blocks, 2)
        what = "minimums that are NaN or Inf: the file is corrupt"
    else:  # -128 d or -8 d: exact in float16 (a power of two), unless it overflows
        mins = (scale32 * (-128.0 if bits == 8 else -8.0)).to(torch.float16)
        what = f"scales beyond {65504 / (128 if bits == 8 else 8):g}, which this runtime cannot keep as groups"
    if not bool(torch.isfinite(mins.float()).all()):
        raise UserError(f"{where} ({name}) has block {what}; download the file again")
    data = pack(codes.reshape(rows, cols), bits)  # our layout: one vector per row, no padding
    return QuantizedTensor(data.contiguous(), scale.contiguous(), mins.contiguous(), shape, torch.float32, config)


def to_values(raw: torch.Tensor, ggml_type: int, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of `shape` whose bytes are `raw`: plain values in their own dtype, anything else
    dequantized to float32 by the gguf package (what transformers loads)."""
    if ggml_type in _FLOAT:
        return raw.reshape(-1).view(_FLOAT[ggml_type]).reshape(shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows = shape[0] if len(shape) > 1 else 1
    try:
        values = dequantize(raw.reshape(rows, -1).numpy(), GGMLQuantizationType(ggml_type))
    except NotImplementedError:
        raise UserError(f"the gguf package cannot dequantize {type_name} tensors; pip install -U gguf, or "
                        "convert the model with another quantization type") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of every block: (rows, groups)."""
    return blocks[..., at:at + 2].contiguous().view(torch.float16).squeeze(-1)
