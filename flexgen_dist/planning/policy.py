"""The offloading policy: how a block is cut into GPU batches and where every tensor lives.

Same fields as FlexGen's `Policy`, by keyword. Percentages are of each kind of tensor: weights
(split by cumulative size within a layer), KV cache and activations (split per tensor). The disk
tier takes what gpu and cpu do not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UserError
from .compression import CompressionConfig

CACHE_DTYPES = ("float32", "float16", "bfloat16")


MAX_GPU_BATCHES = 4096
"""Most GPU batches in a block (the placement lists each batch's cache for each layer)."""
MAX_BLOCK_SIZE = 1 << 20
"""Most sequences in a block: every one of them holds a KV cache for the whole block's run."""


def check_block(gpu_batch_size: int, num_gpu_batches: int) -> None:
    """UserError when a block is past MAX_GPU_BATCHES or MAX_BLOCK_SIZE."""
    if num_gpu_batches > MAX_GPU_BATCHES or gpu_batch_size * num_gpu_batches > MAX_BLOCK_SIZE:
        raise UserError(f"policy: a block of {gpu_batch_size} x {num_gpu_batches} gpu batches is past the limits "
                        f"({MAX_GPU_BATCHES} gpu batches, {MAX_BLOCK_SIZE} sequences); give smaller "
                        f"--gpu-batch-size / --num-gpu-batches")


@dataclass(frozen=True)
class Policy:
    gpu_batch_size: int = 1
    """Sequences computed together in one kernel call."""
    num_gpu_batches: int = 1
    """GPU batches per block; a layer's weights are loaded once for all of them."""
    w_gpu_percent: float = 100.0
    """Share of each layer's weights on the gpu tier (the compute device)."""
    w_cpu_percent: float = 0.0
    """Share of each layer's weights in host memory; the disk takes the rest."""
    cache_gpu_percent: float = 100.0
    """Share of KV-cache tensors on the gpu tier."""
    cache_cpu_percent: float = 0.0
    """Share of KV-cache tensors in host memory; the disk takes the rest."""
    act_gpu_percent: float = 100.0
    """Share of activations (hidden states between layers) on the gpu tier."""
    act_cpu_percent: float = 0.0
    """Share of activations in host memory; the disk takes the rest."""
    overlap: bool = True
    """Load the next layer's weights and the next batch's cache while computing."""
    pin_weight: bool = True
    """Pin host-memory weights (pays off only with a CUDA device)."""
    cpu_cache_compute: bool = False
    """Run decode attention on the CPU over the host-memory part of the KV cache, in place."""
    experts_on_demand: bool = True
    """A mixture of experts' decode steps load each expert that is not on the compute device when
    the router first chooses it for a row of the block, on the compute path; else every expert
    loads ahead with its layer, overlapped (as in the prefill). Fewer bytes against no overlap:
    the planner chooses (the share chosen grows with the block's rows)."""
    attn_sparsity: float = 1.0
    """Fraction of each head's attention positions whose values are loaded and used in decoding
    (1.0 = dense; 0.1 = the top 10 %, the paper's 4-bit-S setting)."""
    compress_weight: bool = False
    """Store 2-D weights as groups of `compression.bits`-bit values on every tier, dequantized on
    the compute device once per layer per block (biases and norms stay as they are)."""
    compress_cache: bool = False
    """Store the KV cache as groups of `compression.bits`-bit values (quantized on store)."""
    compression: CompressionConfig = CompressionConfig()
    """Bits and group size of weight and cache compression (groups along the last dimension:
    a weight's input dimension, the cache's head dimension)."""
    cache_dtype: str | None = None
    """Storage dtype of an uncompressed KV cache (None: the compute dtype, which keeps greedy
    output equal to transformers); 16 bits halve cache I/O, converted for attention."""

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"policy: {name} must be a whole number >= 1, got {value!r}")
        check_block(self.gpu_batch_size, self.num_gpu_batches)
        for kind in ("w", "cache", "act"):
            gpu = getattr(self, f"{kind}_gpu_percent")
            cpu = getattr(self, f"{kind}_cpu_percent")
            for tier, value in (("gpu", gpu), ("cpu", cpu)):
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
                    raise UserError(
                        f"policy: {kind}_{tier}_percent must be a number from 0 to 100, got {value!r}"
                    )
            if gpu + cpu > 100 + 1e-9:
                raise UserError(
                    f"policy: {kind}_gpu_percent + {kind}_cpu_percent = {gpu + cpu:g} is over 100; "
                    "lower one of them (the disk takes the rest)"
                )
        sparsity = self.attn_sparsity
        if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 < sparsity <= 1:
            raise UserError(f"policy: attn_sparsity must be in (0, 1] (1 = dense, 0.1 = top 10 %), got {sparsity!r}")
        if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
            raise UserError(f"policy: cache_dtype {self.cache_dtype!r} is unknown; use one of {', '.join(CACHE_DTYPES)}")
        if not isinstance(self.compression, CompressionConfig) or self.compression.group_dim != -1:
            raise UserError("policy: compression must be a CompressionConfig grouping along the last dimension (-1)")

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    def percents(self, kind: str) -> tuple[float, float, float]:
        """(gpu, cpu, disk) percentages for kind in {"w", "cache", "act"}."""
        gpu = float(getattr(self, f"{kind}_gpu_percent"))
        cpu = float(getattr(self, f"{kind}_cpu_percent"))
        return gpu, cpu, max(0.0, 100.0 - gpu - cpu)

    def replace(self, **changes) -> "Policy":
        return dataclasses.replace(self, **changes)
