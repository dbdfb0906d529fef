"""How a model runs on this machine: compute device, dtypes, prefetch and disk reads, and the
workload the plan is sized for."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..planning.placement import DTYPE_BYTES, Dtypes, Workload
from ..spec.model import ModelSpec
from ..storage.tiers import DiskIO


@dataclass(frozen=True)
class Runtime:
    device: str | None = None
    """Compute device: "cpu", "cuda" or "cuda:N" (default: this rank's GPU when there is one, else the CPU)."""
    compute_dtype: str | None = None
    """What layers compute in. None ("auto"): on a GPU bfloat16 for a bfloat16 checkpoint where
    the GPU has it natively, else float16; on a CPU, for a 16-bit checkpoint, float32, the
    checkpoint's own dtype or (for a float16 one) bfloat16, whichever the planner predicts
    fastest from this machine's profile of each (16-bit matmuls are several times faster than
    fp32 on CPUs with AVX-512 BF16 or AMX and several times slower on AVX2-only ones); float32
    for a float32 checkpoint. float32 is what gives transformers' fp32 tokens exactly."""
    storage_dtype: str | None = None
    """Host and disk copies of the weights (default: the checkpoint's dtype)."""
    prefetch_depth: int = 1
    """Layers of weights loaded ahead of the computing one (each costs a layer of memory)."""
    disk_io: DiskIO = field(default_factory=DiskIO)
    """How disk-tier tensors are read (threads, O_DIRECT, page-cache eviction)."""
    verify_offload: bool = False
    """Re-check the checksum of every reused offload-folder file before the run."""
    prune_offload: bool = False
    """Remove the offload folder's weight folders of vanished or changed checkpoints."""
    refill: bool = True
    """A row whose sequence finished takes the next waiting prompt inside its block (one rank)."""
    num_prompts: int | None = None
    """How many prompts the plan is for (the planner's throughput counts the last block's
    padding); None: many."""
    workload: Workload | None = None
    """The widest prompt and the new tokens the plan is sized for (default: the model's positions);
    a longer run re-sizes the KV cache and buffers for itself."""
    scoring: bool = False
    """Plan for `LLM.score`: the head's fp32 logits of every prompt position (batch, prompt,
    vocabulary), not only of the last one, count in the plan's compute memory."""

    def __post_init__(self) -> None:
        for name in ("compute_dtype", "storage_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPE_BYTES:
                raise UserError(f"{name} {value!r} is unknown; use one of {', '.join(DTYPE_BYTES)}")
        if not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 1:
            raise UserError(f"prefetch depth must be a whole number >= 1, got {self.prefetch_depth!r}")

    def resolve_device(self) -> torch.device:
        """One identity per device: "cuda" becomes "cuda:<current index>", so tensors placed on the
        device compare equal to it."""
        if self.device is None:
            return torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise UserError(f"device {self.device!r} is not a device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"device {self.device!r} asked for but no CUDA GPU is visible; use --device cpu")
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index >= torch.cuda.device_count():
                raise UserError(f"device {self.device!r}: only {torch.cuda.device_count()} GPU(s) visible")
            return torch.device(f"cuda:{index}")
        if device.type != "cpu":
            raise UserError(f"device {self.device!r} is not supported; use cpu or cuda")
        return device

    def dtypes(self, spec: ModelSpec, device: torch.device) -> Dtypes:
        """The dtypes when nothing is measured: the first of `dtype_choices`."""
        return self.dtype_choices(spec, device)[0]

    def dtype_choices(self, spec: ModelSpec, device: torch.device) -> list[Dtypes]:
        """The dtypes the planner chooses between by predicted throughput (the first where it
        cannot measure). Computing in the checkpoint's own 16-bit dtype converts nothing; float32
        widens exactly; bfloat16 for a float16 checkpoint rounds each weight to 8 significant bits
        (fp16 has 11; every fp16 value is in bf16's range): CPUs with bf16 units but slow fp16
        ones (AVX-512 BF16 without AVX-512 FP16) run it 4-5x faster than fp32. A bfloat16
        checkpoint is never computed in float16 (its range may not fit).

        A float16 checkpoint computed in bfloat16 on a CPU is stored in bfloat16 too (rounded once,
        when its tiers are written, as the compute would round it anyway): converting float16 to
        bfloat16 runs at 4 GB/s of output on the development CPU (float16 to float32: 25), so
        weights on the host tier or on disk cost a conversion pass every step otherwise."""
        storage = self.storage_dtype or (spec.dtype if spec.dtype in DTYPE_BYTES else "float32")

        def stored(compute: str) -> Dtypes:
            same = compute == "bfloat16" and storage == "float16" and device.type == "cpu" and not self.storage_dtype
            return Dtypes(compute=compute, storage=compute if same else storage)

        if self.compute_dtype is not None:
            return [stored(self.compute_dtype)]
        if device.type == "cpu":
            computes = {"float32": ["float32"], "float16": ["float32", "float16", "bfloat16"]}.get(storage, ["float32", storage])
        elif storage == "bfloat16" and _native_bf16(device):
            computes = ["bfloat16"]
        else:
            computes = ["float16"]
        return [stored(compute) for compute in computes]

    def workload_for(self, spec: ModelSpec) -> Workload:
        """The workload to plan for: the runtime's, else prompts of up to half the model's
        positions with up to a quarter more (a longer run re-checks that it still fits)."""
        return self.workload or Workload(prompt_len=min(512, spec.max_positions // 2),
                                         gen_len=max(1, min(128, spec.max_positions // 4)))


def _native_bf16(device: torch.device) -> bool:
    """Whether the compute device itself has bfloat16 (compute capability 8.0+). Asked of that
    device, not the current one, and without emulation: a T4 "supports" bfloat16 by emulation,
    then runs attention on the slow math path."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)
