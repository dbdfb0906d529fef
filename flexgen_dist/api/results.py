"""What generation returns: one `Output` per prompt (the one result type from the engine's
blocks to `LLM.generate`'s caller and a job's output line) and the run's statistics."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True, slots=True)
class Output:
    """One prompt's result."""

    prompt_ids: Sequence[int]  # the prompt as generated from (after a chat template and any truncation)
    output_ids: list[int]  # the new tokens only, up to and including the one that stopped the sequence
    text: str | None  # decoded new text, when the model has a tokenizer (cut before a stop string)
    finish_reason: str  # "stop" (EOS, a stop id or string) or "length" (max_new_tokens)
    index: int = 0  # the prompt's position among those of the call

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if len(self.prompt_ids) < 1:
            raise ValueError("an output's prompt has at least one token")

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class Stats:
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    generated_tokens: int
    num_blocks: int
    num_sequences: int
    prompt_slots: int = 0  # block rows x block width over all blocks: prompt tokens plus padding
    row_steps: int = 0  # block rows x token steps each block ran, over all blocks (padding rows too)
    # The prompts whose prefill ran in the prefill phase (None: all of them). With refill most
    # prompts start in a row of an open block, their prefill inside a decode step (decode_s).
    prefill_prompt_tokens: int | None = None
    prefill_sequences: int | None = None

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def prefill_tokens_per_s(self) -> float:
        tokens = self.prompt_tokens if self.prefill_prompt_tokens is None else self.prefill_prompt_tokens
        return tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token of a sequence prefilled in the prefill phase comes out of it.
        first = self.num_sequences if self.prefill_sequences is None else self.prefill_sequences
        return max(self.generated_tokens - first, 0) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens / (prefill + decode) seconds, as the FlexGen paper counts throughput."""
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def padding_efficiency(self) -> float:
        """Share of the blocks' prompt slots that hold real tokens (1.0: no padding); nan if unknown."""
        return self.prompt_tokens / self.prompt_slots if self.prompt_slots else float("nan")

    @property
    def row_utilization(self) -> float:
        """Generated tokens over the row-steps computed (1.0: no row idle; a row whose sequence
        ended idles unless a waiting prompt takes it, and under --no-refill until its block's
        longest row ends); nan if unknown."""
        return self.generated_tokens / self.row_steps if self.row_steps else float("nan")

    def summary(self) -> str:
        padding = f"; {self.padding_efficiency:.0%} of prompt slots are real tokens" if self.prompt_slots else ""
        if self.row_steps:
            padding += f"; rows busy {self.row_utilization:.0%} of their steps"
        return (
            f"prefill {self.prefill_tokens_per_s:.1f} tok/s, decode {self.decode_tokens_per_s:.1f} tok/s, "
            f"total {self.tokens_per_s:.1f} tok/s ({self.generated_tokens} new tokens in {self.total_s:.2f} s, "
            f"{self.num_sequences} prompts in {self.num_blocks} block{'s' if self.num_blocks != 1 else ''}{padding})"
        )


@dataclass(frozen=True)
class GenerationResult:
    outputs: list[Output]
    stats: Stats


def stats_record(stats, policy, world_size: int, plan=None) -> dict:
    """Machine-readable run statistics (what benchmarks parse), with the plan's prediction and
    this process's memory (peak resident set, and what it held when the plan was made)."""
    data = {
        "world_size": world_size,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "total_s": stats.total_s,
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "prefill_tokens_per_s": stats.prefill_tokens_per_s,
        "decode_tokens_per_s": stats.decode_tokens_per_s,
        "tokens_per_s": stats.tokens_per_s,
        "padding_efficiency": stats.padding_efficiency if stats.prompt_slots else None,
        "row_steps": stats.row_steps,
        "row_utilization": stats.row_utilization if stats.row_steps else None,
        "policy": dataclasses.asdict(policy),
    }
    if plan is not None:
        import resource

        data["planned"] = {
            "searched": plan.searched,
            "tokens_per_s": plan.estimate.throughput,
            "prefill_s": plan.estimate.prefill_s,
            "decode_s": plan.estimate.decode_s,
            "bytes_per_tier": {str(tier): n for tier, n in plan.placement.bytes_per_tier().items()},
            "process_rss_at_plan": plan.process_rss,
            "peak_rss": plan.predicted_peak_rss,
            "dtypes": dataclasses.asdict(plan.placement.dtypes),
            "workload": dataclasses.asdict(plan.placement.workload),
            "buffers": dataclasses.asdict(plan.placement.buffers),
            "hardware": plan.hardware.name,
        }
        data["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return data
