"""From sequences to blocks and back, for `LLM.generate` and `LLM.generate_requests`.

Every sequence carries its own rule: a token limit, stop ids (EOS unless ignored), stop strings,
and sampling settings with a generator stream that belongs to it (a request's index in its file),
so its result does not depend on the block it lands in. Sequences are sorted by prompt length,
longest first, and cut into blocks (little padding); the blocks run through the engine in chunks
of `CHUNK_BLOCKS`, so a job of millions of prompts never holds all its blocks in memory, and the
caller hears of each block's results as the block closes.

Stop strings are tested as tokens are generated, without decoding the whole output every step.
`IncrementalText` turns ids into text a few tokens at a time, the way vLLM and TGI stream text:
it decodes a short window twice (from `prefix` to the last emitted token, and to the new token)
and emits the difference. Starting the window a few tokens back keeps the tokenizer's handling
of word boundaries (a leading space, a byte-level merge) the same as in a full decode, and text
ending in U+FFFD (an incomplete UTF-8 sequence) waits for the next token. The window starts on
the prompt's last tokens, so the first generated word decodes as it would after the prompt.

`StopStringMatcher` keeps only the last `longest stop - 1` characters besides the new text, so a
stop string split across tokens is found, at a constant cost per step. Everything is a function
of the token ids: every rank that tests a row decides the same.

The final text is decoded once from the kept ids and cut before the first stop string
(`trim_at_stop`); as in OpenAI's API, the stop string is not part of the text. The ids keep the
token that completed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..engine.blocks import FINISH_LENGTH, FINISH_STOP_STRING, Block, BlockResult, RowRule
from ..engine.engine import Engine
from ..engine.sampling import RowSampling, Sampler, SamplingParams
from ..errors import UserError
from ..planning.placement import Placement
from .prompts import make_blocks
from .results import Output, Stats
from ..jobs.requests import PromptTokens

CHUNK_BLOCKS = 64  # blocks handed to the engine at once (a multiple of the ranks)


@dataclass(frozen=True)
class RunSettings:
    """A run's generation settings; a request's own settings (jobs.GenSettings) override them."""

    max_new_tokens: int = 32
    do_sample: bool = False  # False: greedy unless a request sets a temperature > 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    stop_token_ids: tuple[int, ...] = ()  # besides EOS
    ignore_eos: bool = False  # run to max_new_tokens past EOS (benchmarks)
    from_model: tuple[str, ...] = ()  # the sampling fields the model's generation_config.json gave (said, not compared)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        SamplingParams(self.do_sample, self.temperature, self.top_k, self.top_p, self.seed)  # its checks
        if any(not s for s in self.stop):
            raise UserError("a stop string is empty, which would stop at once; remove it")

    def record(self) -> dict:
        """What the resume identity compares (JSON)."""
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed, "stop": list(self.stop),
                "stop_token_ids": list(self.stop_token_ids), "ignore_eos": self.ignore_eos}


@dataclass(frozen=True, slots=True)
class SeqSpec:
    """One sequence to generate."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    sampling: RowSampling
    stop_ids: frozenset[int]
    stop: tuple[str, ...] = ()


class SpecMaker:
    """SeqSpecs from a run's settings; objects that rows share are made once (millions of rows)."""

    def __init__(self, settings: RunSettings, eos_ids: Sequence[int]):
        self.settings = settings
        self._eos = frozenset() if settings.ignore_eos else frozenset(int(i) for i in eos_ids)
        self._stop_ids = self._eos | frozenset(settings.stop_token_ids)
        s = settings
        self._run_params = SamplingParams(s.do_sample, s.temperature, s.top_k, s.top_p, s.seed)

    def for_prompt(self, prompt_ids: Sequence[int], stream: int) -> SeqSpec:
        """A prompt with the run's settings; `stream` seeds its sampling (its index)."""
        return SeqSpec(prompt_ids, self.settings.max_new_tokens, RowSampling(self._run_params, stream),
                       self._stop_ids, self.settings.stop)

    def for_request(self, prepared: PromptTokens) -> SeqSpec:
        """A checked request: its own settings over the run's. A line's temperature decides between
        greedy (0) and sampling (> 0); without one, the run's mode holds. A line's seed alone seeds
        it (the same prompt and seed give the same output anywhere); otherwise (run seed, index)."""
        own, run = prepared.request.settings, self.settings
        if own.temperature is None and own.top_k is None and own.top_p is None and own.seed is None:
            params, stream = self._run_params, prepared.request.index
        else:
            temperature = own.temperature if own.temperature is not None else (run.temperature if run.do_sample else 0.0)
            sample = temperature > 0
            params = SamplingParams(
                do_sample=sample, temperature=temperature if sample else 1.0,
                top_k=own.top_k if own.top_k is not None else run.top_k,
                top_p=own.top_p if own.top_p is not None else run.top_p,
                seed=own.seed if own.seed is not None else run.seed,
            )
            stream = 0 if own.seed is not None else prepared.request.index
        stop_ids = self._stop_ids if own.stop_token_ids is None else self._eos | frozenset(own.stop_token_ids)
        stop = own.stop if own.stop is not None else run.stop
        return SeqSpec(prepared.prompt_ids, prepared.max_new_tokens, RowSampling(params, stream), stop_ids, stop)


@dataclass
class RunTotals:
    """What `run_sequences` adds up over its chunks."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    prompt_slots: int = 0  # block rows x block width: prompt tokens plus padding
    row_steps: int = 0  # block rows x the steps each block ran
    generated_tokens: int = 0
    num_blocks: int = 0
    num_sequences: int = 0
    prefill_prompt_tokens: int = 0  # of the prompts prefilled in the prefill phase (not in a refilled row)
    prefill_sequences: int = 0

    def stats(self) -> Stats:
        return Stats(prefill_s=self.prefill_s, decode_s=self.decode_s, prompt_tokens=self.prompt_tokens,
                     generated_tokens=self.generated_tokens, num_blocks=self.num_blocks,
                     num_sequences=self.num_sequences, prompt_slots=self.prompt_slots, row_steps=self.row_steps,
                     prefill_prompt_tokens=self.prefill_prompt_tokens, prefill_sequences=self.prefill_sequences)


def run_sequences(engine: Engine, specs: Sequence[SeqSpec], *, placement: Placement, pad_id: int,
                  decode: Decode | None, num_ranks: int, holds_results: bool,
                  on_results: Callable[[list[Output]], None], refill: bool = True) -> Stats:
    """Generate every spec with `placement` (sized by the caller for these specs: their longest
    prompt and limit, their block); `on_results` hears each block's results as it closes (on the
    rank that holds them: `holds_results`). Every rank must call this with the same specs.
    refill: a row whose sequence ends takes the next prompt of its chunk (engine/refill.py)."""
    if any(spec.stop for spec in specs) and decode is None:
        raise UserError("stop strings need a tokenizer to decode the output; this model has none: use stop token ids")
    gpu_batch_size, num_gpu_batches = placement.policy.gpu_batch_size, placement.policy.num_gpu_batches
    order = sorted(range(len(specs)), key=lambda i: (-len(specs[i].prompt_ids), -specs[i].max_new_tokens))
    block_size = gpu_batch_size * num_gpu_batches
    per_chunk = block_size * max(num_ranks, CHUNK_BLOCKS // num_ranks * num_ranks)
    totals = RunTotals()
    for start in range(0, len(order), per_chunk):
        chunk = order[start:start + per_chunk]
        blocks, sampler = _blocks(specs, chunk, gpu_batch_size, num_gpu_batches, pad_id, decode)

        def block_done(block_idx: int, result: BlockResult, blocks=blocks) -> None:
            if holds_results:
                found = _results(blocks[block_idx], result, specs, decode)
                totals.generated_tokens += sum(len(r.output_ids) for r in found)
                on_results(found)

        run = engine.run(blocks, sampler, on_block_done=block_done, placement=placement, refill=refill)
        if holds_results:  # every row (padding too) computes each step its block runs
            totals.row_steps += run.row_steps
        totals.prefill_s += run.prefill_s
        totals.decode_s += run.decode_s
        totals.prefill_prompt_tokens += run.prefill_prompt_tokens
        totals.prefill_sequences += run.prefill_sequences
        totals.num_blocks += len(blocks)
        totals.num_sequences += len(chunk)
        totals.prompt_tokens += sum(len(specs[i].prompt_ids) for i in chunk)
        totals.prompt_slots += sum(block.input_ids.numel() for block in blocks)
    return totals.stats()


def _blocks(specs: Sequence[SeqSpec], chunk: list[int], gpu_batch_size: int, num_gpu_batches: int, pad_id: int,
            decode: Decode | None) -> tuple[list[Block], Sampler]:
    """The chunk's blocks (sorted already: make_blocks keeps the order of equal lengths). A block
    runs as many steps as its longest row's limit; a row stops at its own (and a block whose rows
    have all stopped ends at once)."""
    rows_of = make_blocks([list(specs[i].prompt_ids) for i in chunk], gpu_batch_size, num_gpu_batches, pad_id)
    blocks = []
    for rows in rows_of:
        seq_ids = [chunk[r] if r >= 0 else -1 for r in rows.seq_ids]
        steps = max(specs[seq_id].max_new_tokens for seq_id in seq_ids if seq_id >= 0)
        pad_rule = RowRule(steps)
        rules = tuple(_rule(specs[seq_id], decode) if seq_id >= 0 else pad_rule for seq_id in seq_ids)
        blocks.append(Block(rows.input_ids, rows.prompt_mask, seq_ids, steps, frozenset(), rules=rules))
    sampler = Sampler(rows={i: specs[i].sampling for i in chunk})
    return blocks, sampler


def _rule(spec: SeqSpec, decode: Decode | None) -> RowRule:
    matcher = None
    if spec.stop:
        matcher = StopStrings(spec.stop, decode, tuple(int(t) for t in spec.prompt_ids[-8:]))
    return RowRule(spec.max_new_tokens, spec.stop_ids, matcher)


def _results(block: Block, result: BlockResult, specs: Sequence[SeqSpec], decode: Decode | None) -> list[Output]:
    """The block's sequences as outputs (`index`: the sequence's position among `specs`); text
    decoded with special tokens skipped and cut before a stop string."""
    found = []
    for seq_id, ids, finish in zip(block.seq_ids, result.tokens, result.finish):
        if seq_id < 0:
            continue
        text = decode(ids) if decode is not None else None
        if finish == FINISH_STOP_STRING and text is not None:
            text = trim_at_stop(text, specs[seq_id].stop)
        found.append(Output(specs[seq_id].prompt_ids, ids, text, FINISH_LENGTH if finish == FINISH_LENGTH else "stop",
                            index=seq_id))
    return found


# --- stop strings ---------------------------------------------------------------------------------

Decode = Callable[[Sequence[int]], str]  # ids -> text, special tokens skipped
CONTEXT_TOKENS = 5  # prompt tokens the first window starts from (as vLLM)
INCOMPLETE = "\ufffd"  # what a decoder gives for a cut UTF-8 sequence


class IncrementalText:
    def __init__(self, decode: Decode, context: Sequence[int] = ()):
        self._decode = decode
        self._ids = [int(t) for t in context[-CONTEXT_TOKENS:]]
        self._prefix = 0  # the window decoded each step starts here
        self._read = len(self._ids)  # ids before this are emitted

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""
        # The next window starts at the ids emitted now; the ones before it are never decoded
        # again, so drop them: each step costs the same however long the output grows.
        self._ids = self._ids[self._read:]
        self._prefix, self._read = 0, len(self._ids)
        return after[len(before):]


class StopStringMatcher:
    """True from `push` once the output holds one of `stops`."""

    def __init__(self, stops: Sequence[str], decode: Decode, context: Sequence[int] = ()):
        if not stops or any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(stops)
        self._keep = max(len(s) for s in stops) - 1  # a stop string may start this far back
        self._text = IncrementalText(decode, context)
        self._tail = ""

    def push(self, token_id: int) -> bool:
        new = self._text.push(token_id)
        if not new:
            return False
        window = self._tail + new
        if any(stop in window for stop in self._stops):
            return True
        self._tail = window[len(window) - self._keep:] if self._keep else ""
        return False


@dataclass(frozen=True)
class StopStrings:
    """A row's stop strings: calling it makes a fresh matcher (one per block row)."""

    stops: tuple[str, ...]
    decode: Decode
    context: tuple[int, ...] = ()  # the prompt's last tokens

    def __call__(self) -> StopStringMatcher:
        return StopStringMatcher(self.stops, self.decode, self.context)


def trim_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string in it; all of it when there is none."""
    cut = min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))
    return text[:cut]
