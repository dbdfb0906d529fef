"""The offloading policy: how a block is cut into GPU batches and where every tensor lives.

Same fields as FlexGen's `Policy`, by keyword. Percentages are of each kind of tensor: weights
(split by cumulative size within a layer), KV cache and activations (split per tensor). The disk
tier takes what gpu and cpu do not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import NotSupportedYet, UserError

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
    attn_sparsity: float = 1.0
    """Fraction of attention kept (1.0 = dense; sparse attention is not supported yet)."""
    compress_weight: bool = False
    """Store weights as 4-bit groups (not supported yet)."""
    compress_cache: bool = False
    """Store the KV cache as 4-bit groups (not supported yet)."""

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"policy: {name} must be a whole number >= 1, got {value!r}")
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
        if self.attn_sparsity != 1.0:
            raise NotSupportedYet("policy: attn_sparsity < 1 is not supported yet; use 1.0 (dense)")
        if self.compress_weight:
            raise NotSupportedYet("policy: compress_weight=True is not supported yet; leave it False")
        if self.compress_cache:
            raise NotSupportedYet("policy: compress_cache=True is not supported yet; leave it False")

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
