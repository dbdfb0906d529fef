"""The Python API: `LLM(model_dir, policy=...).generate(prompts, ...)`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..parallel.comm import PipeComm
from ..parallel.context import DistContext
from ..parallel.partition import partition_layers
from ..engine.engine import Block, Engine
from ..engine.sampling import Sampler, SamplingParams
from ..errors import NotSupportedYet, UserError
from ..model import Unit, make_math, model_units
from ..model.checkpoint import CheckpointSource, RandomSource
from ..planning.capacity import StageFootprint, fit_policy
from ..planning.policy import Policy
from ..planning.sizes import format_size
from ..planning.spec import ModelSpec
from ..storage.tiers import DiskIO
from ..storage.weights import WeightStore
from .prompts import PreparedPrompts, make_blocks, prepare_prompts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    prompt_ids: list[int]
    output_ids: list[int]  # the new tokens only
    text: str | None  # decoded new text, when the model has a tokenizer


@dataclass(frozen=True)
class Stats:
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    generated_tokens: int
    num_blocks: int
    num_sequences: int

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token of each sequence comes out of the prefill.
        return max(self.generated_tokens - self.num_sequences, 0) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens / (prefill + decode) seconds, as the FlexGen paper counts throughput."""
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"prefill {self.prefill_tokens_per_s:.1f} tok/s, decode {self.decode_tokens_per_s:.1f} tok/s, "
            f"total {self.tokens_per_s:.1f} tok/s ({self.generated_tokens} new tokens in {self.total_s:.2f} s)"
        )


@dataclass(frozen=True)
class GenerationResult:
    outputs: list[Output]
    stats: Stats


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
    return dtype


def _load_tokenizer(model_dir: Path):
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _stage_units(units: list[Unit], num_ranks: int, rank: int, stage_layers) -> list[Unit]:
    """This rank's contiguous slice: the embedding on the first stage, the head on the last.

    Stages are balanced by parameter count (a proxy for both load time and compute time); the
    embedding counts at a tenth of its size, since its compute is a row lookup."""
    embed, blocks, head = units[0], units[1:-1], units[-1]
    costs = [sum(w.numel for w in u.weights) for u in blocks]
    ranges = partition_layers(
        costs,
        num_ranks,
        first_extra=sum(w.numel for w in embed.weights) / 10,
        last_extra=sum(w.numel for w in head.weights),
        override=list(stage_layers) if stage_layers is not None else None,
    )
    mine = [blocks[i] for i in ranges[rank]]
    return ([embed] if rank == 0 else []) + mine + ([head] if rank == num_ranks - 1 else [])


class LLM:
    """A model placed across gpu / cpu / disk by a policy, ready to generate.

    model: a local Hugging Face folder (config.json, safetensors weights, tokenizer files).
    policy: where tensors live and how blocks are cut (defaults: everything on the compute device).
    offload_dir: folder for disk-tier weights (kept and reused) and KV cache (temporary).
    device: compute device (default: CUDA when available, else the CPU).
    compute_dtype: default fp32 on the CPU (16-bit matmuls are slow there), the checkpoint's
        16-bit type (or fp16) on a GPU. storage_dtype: host and disk copies; default the checkpoint's.
    """

    def __init__(
        self,
        model: str | Path,
        policy: Policy | None = None,
        offload_dir: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        compute_dtype: str | torch.dtype | None = None,
        storage_dtype: str | torch.dtype | None = None,
        dist: DistContext | None = None,
        stage_layers: Sequence[int] | None = None,
        comm_timeout_s: float = 300.0,
        gpu_mem: int | None = None,
        cpu_mem: int | None = None,
        max_seq_len: int | None = None,
        disk_io: DiskIO | None = None,
        prefetch_depth: int = 1,
        tracer=None,
        _spec: ModelSpec | None = None,
        _source=None,
        _tokenizer=None,
    ):
        self.policy = policy or Policy()
        self.spec = _spec or ModelSpec.from_dir(model)
        self.model_dir = Path(model) if model is not None else None
        self.device = torch.device(device) if device is not None else _default_device()
        self.storage_dtype = _dtype(storage_dtype or self.spec.dtype)
        if compute_dtype is not None:
            self.compute_dtype = _dtype(compute_dtype)
        elif self.device.type == "cpu":
            self.compute_dtype = torch.float32
        else:
            self.compute_dtype = torch.bfloat16 if self.storage_dtype == torch.bfloat16 else torch.float16
        self.offload_dir = Path(offload_dir) if offload_dir is not None else None
        self._prefetch_depth = prefetch_depth
        self._check_policy()
        source = _source if _source is not None else CheckpointSource(model)
        self.tokenizer = _tokenizer if _tokenizer is not None else (_load_tokenizer(self.model_dir) if _source is None else None)
        self.dist = dist if dist is not None and dist.world_size > 1 else None
        self.units = model_units(self.spec)
        comm = None
        if self.dist is not None:
            self.units = _stage_units(self.units, self.dist.world_size, self.dist.rank, stage_layers)
            if not torch.distributed.is_initialized():
                self.dist.init_process_group(comm_timeout_s)
            comm = PipeComm(self.dist.rank, self.dist.world_size, self.dist.backend, self.device, comm_timeout_s)
        elif stage_layers is not None and list(stage_layers) != [self.spec.num_layers]:
            raise UserError("--stage-layers needs one entry per rank; with one process, drop it")
        if gpu_mem is not None or cpu_mem is not None:
            self.policy = self._fit_to_capacity(gpu_mem, cpu_mem, max_seq_len)
            self._check_policy()
        self.weights = WeightStore(
            self.units, source, self.policy, self.device, self.compute_dtype, self.storage_dtype, self.offload_dir,
            disk_io=disk_io or DiskIO(),
        )
        source.close()
        self.engine = Engine(
            self.spec,
            self.units,
            self.weights,
            make_math(self.spec, self.device),
            self.policy,
            self.device,
            self.compute_dtype,
            self.offload_dir,
            comm,
            tracer,
            prefetch_depth,
        )
        log.info(
            "%s: schedule layers %d..%d of %d on %s (%s compute); weights per tier (bytes): %s",
            self.spec.model_type,
            self.units[0].layer_idx,
            self.units[-1].layer_idx,
            self.spec.num_layers + 2,
            self.device,
            str(self.compute_dtype).removeprefix("torch."),
            self.weights.bytes_per_tier(),
        )

    @classmethod
    def from_config(
        cls,
        config,
        seed: int = 0,
        policy: Policy | None = None,
        offload_dir: str | Path | None = None,
        *,
        storage_dtype: str | torch.dtype = "float16",
        **kwargs,
    ) -> "LLM":
        """A model with seeded random weights (for benchmarks): explicit, never implied by a path."""
        spec = ModelSpec.from_config(config)
        std = float(spec.raw.get("initializer_range") or 0.02)
        return cls(
            None,
            policy,
            offload_dir,
            storage_dtype=storage_dtype,
            _spec=spec,
            _source=RandomSource(seed, std),
            **kwargs,
        )

    def _fit_to_capacity(self, gpu_mem, cpu_mem, max_seq_len) -> Policy:
        if gpu_mem is None or cpu_mem is None:
            raise UserError("give both --gpu-mem and --cpu-mem (per rank), or neither")
        s, p = self.spec, self.policy
        seq = max_seq_len or s.max_positions
        itemsize = torch.empty((), dtype=self.compute_dtype).element_size()
        in_flight = self.dist.world_size if self.dist is not None else 1
        cache_layers = sum(u.has_cache for u in self.units)
        footprint = StageFootprint(
            weight_numel=sum(w.numel for u in self.units for w in u.weights),
            max_unit_numel=max(sum(w.numel for w in u.weights) for u in self.units),
            compute_itemsize=itemsize,
            storage_itemsize=torch.empty((), dtype=self.storage_dtype).element_size(),
            cache_bytes=in_flight * cache_layers * 2 * seq * p.block_size * s.kv_dim * itemsize,
            act_bytes=2 * p.block_size * seq * max(s.hidden_size, s.intermediate_size) * itemsize,
            buffered_layers=self._prefetch_depth + 1,
        )
        fitted = fit_policy(p, footprint, gpu_mem, cpu_mem).policy
        log.info(
            "fitted to gpu %s, cpu %s: weights %g/%g %%, cache %g/%g %% on gpu/cpu",
            format_size(gpu_mem), format_size(cpu_mem), fitted.w_gpu_percent, fitted.w_cpu_percent,
            fitted.cache_gpu_percent, fitted.cache_cpu_percent,
        )
        return fitted

    def _check_policy(self) -> None:
        """Refuse a policy that cannot work before anything is allocated."""
        p = self.policy
        on_disk = [kind for kind, name in (("w", "weights"), ("cache", "KV cache"), ("act", "activations")) if p.percents(kind)[2] > 0]
        if on_disk and self.offload_dir is None:
            names = {"w": "weights", "cache": "KV cache", "act": "activations"}
            raise UserError(
                f"the policy puts {', '.join(names[k] for k in on_disk)} on disk but no offload folder was given; "
                "pass offload_dir (CLI: --offload-dir DIR)"
            )

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Continue each prompt by up to `max_new_tokens` tokens (see the class docstring).

        ignore_eos: generate all `max_new_tokens` even past EOS (benchmarks measure a fixed length)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        sampler = Sampler(SamplingParams(do_sample, temperature, top_k, top_p, seed))
        prepared: PreparedPrompts = prepare_prompts(prompts, self.tokenizer, self.spec, max_new_tokens)
        eos = frozenset() if ignore_eos else frozenset(self.spec.eos_token_ids)
        stop_ids = eos | frozenset(int(i) for i in (stop_token_ids or ()))
        pad_id = self.spec.pad_token_id if self.spec.pad_token_id is not None else 0
        blocks = [
            Block(rows.input_ids, rows.prompt_mask, rows.seq_ids, max_new_tokens, stop_ids)
            for rows in make_blocks(prepared.ids, self.policy.gpu_batch_size, self.policy.num_gpu_batches, pad_id)
        ]
        run = self.engine.run(blocks, sampler)
        prefill_s, decode_s = run.prefill_s, run.decode_s
        if self.dist is not None and self.dist.rank != 0:
            # Results live on rank 0, which received every sampled token round the ring.
            stats = Stats(prefill_s, decode_s, 0, 0, len(blocks), 0)
            return GenerationResult(outputs=[], stats=stats)
        results: dict[int, list[int]] = {}
        for block, res in zip(blocks, run.blocks):
            for seq_id, toks in zip(block.seq_ids, res.tokens):
                if seq_id >= 0:
                    results[seq_id] = toks
        outputs = []
        for i, prompt_ids in enumerate(prepared.ids):
            ids = results[i]
            text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else None
            outputs.append(Output(prompt_ids=list(prompt_ids), output_ids=ids, text=text))
        stats = Stats(
            prefill_s=prefill_s,
            decode_s=decode_s,
            prompt_tokens=sum(len(p) for p in prepared.ids),
            generated_tokens=sum(len(o.output_ids) for o in outputs),
            num_blocks=len(blocks),
            num_sequences=len(outputs),
        )
        return GenerationResult(outputs=outputs, stats=stats)

    def score(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[float]]:
        """Log-probability of every prompt token after the first, given the tokens before it
        (natural log), through the same engine and policy as `generate`. For perplexity."""
        if self.dist is not None:
            raise NotSupportedYet("score() over several ranks is not supported yet; run it in one process")
        prepared = prepare_prompts(prompts, self.tokenizer, self.spec, max_new_tokens=0)  # scoring adds no position
        pad_id = self.spec.pad_token_id if self.spec.pad_token_id is not None else 0
        blocks = [
            Block(rows.input_ids, rows.prompt_mask, rows.seq_ids, 1, frozenset(), score=True)
            for rows in make_blocks(prepared.ids, self.policy.gpu_batch_size, self.policy.num_gpu_batches, pad_id)
        ]
        run = self.engine.run(blocks, Sampler(SamplingParams()))
        scores: dict[int, list[float]] = {}
        for block, res in zip(blocks, run.blocks):
            for seq_id, row_scores in zip(block.seq_ids, res.scores):
                if seq_id >= 0:
                    scores[seq_id] = row_scores
        return [scores[i] for i in range(len(prepared.ids))]

    def close(self) -> None:
        """Stop the I/O threads and, with several ranks, destroy the process group."""
        self.engine.close()
        self.weights.close()
        if self.dist is not None:
            self.dist.destroy()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
