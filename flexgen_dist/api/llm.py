"""The Python API: `LLM(model_dir, policy=...).generate(prompts, ...)`.

`LLM.__init__` is the composition root: it reads the model, plans the placement (the one object
that says where every tensor lives), places the weights, and builds the engine. Nothing else
wires the layers together.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..engine.blocks import Block, RowRule
from ..engine.engine import Engine, EngineConfig
from ..engine.sampling import Sampler, SamplingParams, TeacherForcing
from ..engine.walk import Tracing
from ..errors import NotSupportedYet, UserError
from ..model import make_math
from ..parallel.group import Pipeline
from ..planning.fit import PolicyDoesNotFit, check_policy
from ..spec.checks import GenerationDefaults
from ..planning.place import plan_placement
from ..planning.cost_terms import chosen_share
from ..planning.placement import Placement, Tier, Workload
from ..planning.policy import Policy
from ..planning.search import SearchOptions
from ..sizes import format_size
from ..storage.tiers import DiskReader
from ..storage.weights import WeightStore
from .generation import RunSettings, SeqSpec, SpecMaker, run_sequences
from .model_source import ModelSource
from .planner import Capacity, PlanChoice, block_for, plan_for
from .prompts import make_blocks, prepare_prompts
from .results import GenerationResult, Output, Stats
from .runtime import Runtime
from ..jobs.requests import PromptTokens

log = logging.getLogger(__name__)


class LLM:
    """A model placed across gpu / cpu / disk by a policy, ready to generate.

    model: a local Hugging Face folder (config.json, safetensors weights, tokenizer files), a GGUF
        file (or a folder holding one and no config.json), or a `ModelSource` (e.g.
        `ModelSource.random(config, seed)` for benchmarks).
    policy: where tensors live and how blocks are cut. None (the default): chosen by the planner
        (cost model and search) for this machine and the runtime's workload. A given policy is
        checked against the memory there is and refused, naming the tier, if it does not fit.
    offload_dir: folder for disk-tier weights (kept and reused) and KV cache (temporary); without
        one nothing goes to disk.
    runtime: device, dtypes, prefetch depth, disk reads, the workload to plan for (`Runtime`).
    capacity: per-rank memory over what is detected, or a hardware description (`Capacity`).
    search: what the planner may choose (compression, CPU attention, block shapes) and a latency bound.
    base: with `policy=None`, the settings the planner keeps (e.g. `Policy(compress_weight=True)`).
    plan: a plan made already (`planner.plan_for`, e.g. to print it or to record its policy first);
        then policy, capacity, search and base are not used.
    pipeline: this rank's place in a multi-rank pipeline (`Pipeline.start(ctx)`); the caller owns
        its process group.
    tracer: records a span per op (`--trace`).
    """

    def __init__(
        self,
        model: str | Path | ModelSource,
        *,
        policy: Policy | None = None,
        offload_dir: str | Path | None = None,
        runtime: Runtime | None = None,
        capacity: Capacity | None = None,
        search: SearchOptions | None = None,
        base: Policy | None = None,
        plan: PlanChoice | None = None,
        pipeline: Pipeline | None = None,
        tracer: Tracing | None = None,
    ):
        source = model if isinstance(model, ModelSource) else ModelSource.from_path(model)
        self.runtime = runtime or Runtime()
        self.spec, self.tokenizer = source.spec, source.tokenizer
        self.generation = source.generation or GenerationDefaults(source.spec.eos_token_ids)
        self.device = self.runtime.resolve_device()
        if self.device.type == "cuda":  # streams, events and host registration use the current device's
            torch.cuda.set_device(self.device)
        self.pipeline = pipeline if pipeline is not None and pipeline.world_size > 1 else None
        self.offload_dir = Path(offload_dir) if offload_dir is not None else None
        self.plan = plan or plan_for(self.spec, runtime=self.runtime, policy=policy, capacity=capacity or Capacity(),
                                     options=search or SearchOptions(), offload_dir=self.offload_dir,
                                     pipeline=pipeline, base=base)
        self.auto = self.plan.searched
        if self.pipeline is not None:  # wait for a peer as long as the plan's tasks may take
            self.pipeline.expect_tasks(self.plan.estimate.longest_task_s)
        log.info("%s", self.plan.log_line())
        self.placement, self.units = self.plan.placement, self.plan.units
        self.policy = self.placement.policy
        self._sized: tuple[tuple, Placement] | None = None  # the last call's re-sized placement, by its key
        units = self.units
        reader = None
        if self.placement.has_disk():
            buf = self.placement.buffer("read buffers")
            reader = DiskReader(self.runtime.disk_io, buf.nbytes_each, pin=self.device.type == "cuda")
        self.reader = reader
        self.weights = WeightStore(placement=self.placement, units=units, source=source.weights, device=self.device,
                                   offload_dir=self.offload_dir, reader=reader, verify=self.runtime.verify_offload,
                                   prune=self.runtime.prune_offload)
        source.weights.close()
        config = EngineConfig(units=tuple(units), placement=self.placement, device=self.device,
                              offload_dir=self.offload_dir, prefetch_depth=self.runtime.prefetch_depth)
        self.engine = Engine(config=config, weights=self.weights, math=make_math(self.spec, self.device),
                             reader=reader, comm=self.pipeline.comm if self.pipeline else None, tracer=tracer)
        log.info("%s: layers %d..%d of %d on %s (%s compute); planned bytes per tier: %s",
                 self.spec.model_type, units[0].layer_idx, units[-1].layer_idx, self.spec.num_layers + 2,
                 self.device, self.placement.dtypes.compute, footprint(self.placement))

    @classmethod
    def from_config(cls, config, seed: int = 0, **kwargs) -> "LLM":
        """A model with seeded random weights (for benchmarks): explicit, never implied by a path."""
        return cls(ModelSource.random(config, seed), **kwargs)

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        stop: Sequence[str] | None = None,
    ) -> GenerationResult:
        """Continue each prompt by up to `max_new_tokens` tokens.

        stop: strings that end a sequence (needs a tokenizer); the text is cut before them.
        ignore_eos: generate all `max_new_tokens` even past EOS (benchmarks measure a fixed length).
        do_sample, temperature, top_k, top_p: None takes the model's generation_config.json value, as
        transformers' generate does (else greedy, 1, off, 1)."""
        sampling = self.generation.sampling(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        settings = RunSettings(max_new_tokens=max_new_tokens, do_sample=sampling["do_sample"],
                               temperature=sampling["temperature"], top_k=sampling["top_k"], top_p=sampling["top_p"],
                               seed=seed, stop=tuple(stop or ()), from_model=sampling["from_file"],
                               stop_token_ids=tuple(int(i) for i in (stop_token_ids or ())), ignore_eos=ignore_eos)
        prepared = prepare_prompts(prompts, self.tokenizer, self.spec, max_new_tokens)
        maker = SpecMaker(settings, self.spec.eos_token_ids)
        specs = [maker.for_prompt(ids, stream=index) for index, ids in enumerate(prepared.ids)]
        found: dict[int, Output] = {}
        stats = self._run(specs, lambda results: found.update((r.index, r) for r in results))
        if not self._holds_results:
            return GenerationResult(outputs=[], stats=stats)  # results live on rank 0
        return GenerationResult(outputs=[found[i] for i in range(len(specs))], stats=stats)

    def generate_requests(self, prompts: Sequence[PromptTokens], settings: RunSettings,
                          on_results: Callable[[list[tuple[PromptTokens, Output]]], None]) -> Stats:
        """Generate checked job requests (`requests.check_tokens`), each with its own settings
        over `settings`. `on_results` gets each block's finished requests as the block closes, on
        rank 0 (which holds the results of a pipeline); every rank must call this with the same
        prompts. A request's sampling is seeded from its index in the job file (or its own seed),
        so a resumed or sharded run samples what an uninterrupted one does."""
        maker = SpecMaker(settings, self.spec.eos_token_ids)
        specs = [maker.for_request(p) for p in prompts]

        return self._run(specs, lambda results: on_results([(prompts[r.index], r) for r in results]))

    def _run(self, specs: list[SeqSpec], on_results: Callable[[list[Output]], None]) -> Stats:
        needed = Workload(max(len(s.prompt_ids) for s in specs), max(s.max_new_tokens for s in specs))
        placement = self._placement_for(len(specs), needed)
        counts = self.weights.counts
        offered, loaded = counts.experts_offered, counts.experts_loaded
        stats = run_sequences(self.engine, specs, placement=placement, pad_id=self._pad_id,
                              decode=self.decode if self.tokenizer is not None else None,
                              num_ranks=self.pipeline.world_size if self.pipeline else 1,
                              holds_results=self._holds_results, on_results=on_results, refill=self.runtime.refill)
        if counts.experts_offered > offered:  # what the cost model assumed of the router, measured
            s, policy = self.spec, placement.policy
            log.info("decode steps loaded %.0f%% of the experts they could (the plan assumed %.0f%% for blocks of %d)",
                     100 * (counts.experts_loaded - loaded) / (counts.experts_offered - offered),
                     100 * chosen_share(s.num_experts, s.num_experts_per_tok, policy.block_size), policy.block_size)
        return stats

    def _placement_for(self, num_prompts: int, needed: Workload, scoring: bool = False) -> Placement:
        """The placement a call runs with, sized here, before the engine runs (the engine never
        plans): the plan's when the call is the workload it was planned for, else the plan's
        tiers re-sized once for the call's lengths, its block (a planned block shrinks to fewer
        prompts: less padding, the same outputs; a given one is kept) and scoring (the head's
        logits of every prompt position). One that needs more memory than planned on some tier
        is checked against the memory there is first. The last re-sized one is kept for the
        next call of the same workload."""
        planned = self.placement
        policy = block_for(self.policy, num_prompts) if self.auto else self.policy
        key = (needed, policy, dataclasses.replace(planned.buffers, scoring=scoring))
        if key == (planned.workload, planned.policy, planned.buffers):
            return planned
        if self._sized is not None and self._sized[0] == key:
            return self._sized[1]
        sized = plan_placement(planned.spec, planned.units, policy, dtypes=planned.dtypes, workload=needed, buffers=key[2])
        before, after = planned.bytes_per_tier(), sized.bytes_per_tier()
        if any(after[tier] > before[tier] for tier in Tier):
            try:
                check_policy(sized, self.plan.hardware)
            except PolicyDoesNotFit as exc:
                what = "scoring prompts" if scoring else "prompts"
                raise UserError(f"{what} of up to {needed.prompt_len} tokens with {needed.gen_len} new ones need more "
                                f"memory than planned for ({planned.workload.prompt_len} + {planned.workload.gen_len}"
                                f"{', scoring' if planned.buffers.scoring else ''}): {exc}; plan for them with "
                                f"Runtime(workload=Workload(...){', scoring=True' if scoring else ''})") from None
        self._sized = (key, sized)
        return sized

    @property
    def _holds_results(self) -> bool:
        """Rank 0 receives every sampled token round the ring; the other ranks hold no results."""
        return self.pipeline is None or self.pipeline.rank == 0

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens skipped (the `text` of every result)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def score(self, prompts: Sequence[str] | Sequence[Sequence[int]], through_cache: bool = False) -> list[list[float]]:
        """Log-probability of every prompt token after the first, given the tokens before it
        (natural log), through the same engine and policy as `generate`. For perplexity.

        through_cache: score one decode step at a time (each token fed as if it had been
        generated), so every prediction reads the KV cache as generation does: the way to see a
        compressed or 16-bit cache or sparse attention, which a prefill never reads."""
        if self.pipeline is not None:
            raise NotSupportedYet("score() over several ranks is not supported yet; run it in one process")
        if through_cache:
            return self._score_through_cache(prompts)
        prepared = prepare_prompts(prompts, self.tokenizer, self.spec, max_new_tokens=0)  # scoring adds no position
        # every prompt position's logits (B, P, V) in fp32: a placement that counts them
        placement = self._placement_for(len(prepared.ids), Workload(max(map(len, prepared.ids)), 1), scoring=True)
        policy = placement.policy
        blocks = [
            Block(rows.input_ids, rows.prompt_mask, rows.seq_ids, 1, frozenset(), score=True)
            for rows in make_blocks(prepared.ids, policy.gpu_batch_size, policy.num_gpu_batches, self._pad_id)
        ]
        run = self.engine.run(blocks, Sampler(SamplingParams()), placement=placement)
        scores: dict[int, list[float]] = {}
        for block, res in zip(blocks, run.blocks):
            for seq_id, row_scores in zip(block.seq_ids, res.scores):
                if seq_id >= 0:
                    scores[seq_id] = row_scores
        return [scores[i] for i in range(len(prepared.ids))]

    def _score_through_cache(self, prompts) -> list[list[float]]:
        prepared = prepare_prompts(prompts, self.tokenizer, self.spec, max_new_tokens=0)
        texts = [ids for ids in prepared.ids if len(ids) >= 2]
        if len(texts) != len(prepared.ids):
            raise UserError("every text scored through the cache needs at least two tokens")
        forcing = TeacherForcing({i: ids[1:] for i, ids in enumerate(texts)})
        placement = self._placement_for(len(texts), Workload(1, max(len(ids) for ids in texts) - 1))
        policy = placement.policy
        starts = [ids[:1] for ids in texts]  # the first token is context; the rest come one step at a time
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for rows in make_blocks([starts[i] for i in order], policy.gpu_batch_size, policy.num_gpu_batches, self._pad_id):
            seq_ids = [order[r] if r >= 0 else -1 for r in rows.seq_ids]
            limits = [len(texts[s]) - 1 if s >= 0 else 1 for s in seq_ids]
            rules = tuple(RowRule(limit) for limit in limits)
            block = Block(rows.input_ids, rows.prompt_mask, seq_ids, max(limits), frozenset(), rules=rules)
            self.engine.run([block], forcing, placement=placement)
        return [forcing.scores[i] for i in range(len(texts))]

    @property
    def _pad_id(self) -> int:
        return self.spec.pad_token_id if self.spec.pad_token_id is not None else 0

    def close(self) -> None:
        """Stop the I/O threads (the pipeline's process group belongs to whoever started it)."""
        self.engine.close()
        self.weights.close()
        if self.reader is not None:
            self.reader.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def footprint(placement: Placement) -> str:
    """Planned bytes per tier, for the log: 'gpu 1.20 GiB, cpu 300.00 MiB, disk 0 B'."""
    return ", ".join(f"{tier} {format_size(n)}" for tier, n in placement.bytes_per_tier().items())
