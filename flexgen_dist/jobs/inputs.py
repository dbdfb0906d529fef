"""What a run generates from: a job file (`--input`), prompts on the command line (`--prompt`),
the bundled example prompts, or random token ids (`--prompt-len`, FlexGen's benchmark shape).
Each becomes a `JobFile` of `Request`s, so all four go through the same checks, blocks, resume
log and output rows; and `tokenize_job` checks every prompt against the model before it loads.
"""

from __future__ import annotations

import hashlib
import json
import random
from array import array
from collections.abc import Mapping
from pathlib import Path

from ..errors import UserError
from ..planning.policy import check_block
from ..spec.model import ModelSpec
from .config import JobConfig
from .jobfiles import JobFile, read_job_file
from .requests import Request, check_text
from .shards import Shard
from .requests import PromptTokens, check_tokens

BUNDLED_TEXT = Path(__file__).resolve().parents[1] / "data" / "heldout.txt"
DEFAULT_NUM_PROMPTS = 256  # the default run: enough work for its throughput line to mean something
PROMPT_WORDS = 8  # each bundled prompt: the first words of a paragraph of the held-out text
SHOWN = 4  # continuations printed by a run without --output, beyond which a count is printed
PROMPT_FLAG, BUNDLED, RANDOM = "--prompt", "bundled prompts", "random prompts"  # JobFile.path of each source


MAX_RANDOM_TOKENS = 1 << 24  # random prompt tokens made up for a benchmark (held as Python lists)


def shown_without_output(job: JobFile) -> int | None:
    """Continuations a run without --output prints: every --prompt, the first few bundled ones,
    none of random token ids (a benchmark)."""
    return {PROMPT_FLAG: None, RANDOM: 0}.get(job.path, SHOWN)


def job_from_config(config: JobConfig, spec: ModelSpec, has_tokenizer: bool, shard: Shard) -> JobFile:
    """The run's requests (this shard's), validated; UserError names the file and line."""
    if config.input is not None and config.prompts:
        raise UserError("give prompts with --input FILE or with --prompt TEXT, not both")
    if config.input is not None:
        if config.num_prompts is not None or config.prompt_len is not None:
            raise UserError("--num-prompts and --prompt-len make prompts when there is no --input; drop them")
        return read_job_file(config.input, shard)
    if config.prompts:
        if config.num_prompts is not None or config.prompt_len is not None:
            raise UserError("--num-prompts and --prompt-len make prompts when there is no --prompt; drop them")
        for number, text in enumerate(config.prompts, start=1):
            check_text(text, PROMPT_FLAG if len(config.prompts) == 1 else f"{PROMPT_FLAG} (the {_ordinal(number)})")
        return text_job(list(config.prompts), PROMPT_FLAG, shard)
    if config.num_prompts is not None and config.num_prompts < 1:
        raise UserError(f"--num-prompts must be >= 1, got {config.num_prompts}")
    if config.prompt_len is not None or not has_tokenizer:
        length = config.prompt_len if config.prompt_len is not None else 32
        if length < 1:
            raise UserError(f"--prompt-len must be >= 1, got {length}")
        # one block of the given shape; for the planner, as many as the bundled prompts
        block = (config.block[0] or 16, config.block[1] or 1)
        check_block(*block)
        count = config.num_prompts or (block[0] * block[1] if any(config.block) else DEFAULT_NUM_PROMPTS)
        if count * length > MAX_RANDOM_TOKENS:
            raise UserError(f"--num-prompts {count} x --prompt-len {length} random tokens is past the {MAX_RANDOM_TOKENS} "
                            f"this makes up; give fewer, or a job file with --input")
        rng = random.Random(config.generation.seed)
        prompts = [[rng.randrange(spec.vocab_size) for _ in range(length)] for _ in range(count)]
        return ids_job(prompts, RANDOM, shard)
    return text_job(bundled_prompts(config.num_prompts or DEFAULT_NUM_PROMPTS), BUNDLED, shard)


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def bundled_prompts(count: int) -> list[str]:
    """The first words of `count` paragraphs of the bundled held-out text (always the same)."""
    paragraphs = [p.split() for p in BUNDLED_TEXT.read_text(encoding="utf-8").split("\n\n")]
    starts = list(dict.fromkeys(" ".join(words[:PROMPT_WORDS]) for words in paragraphs
                                if len(words) >= PROMPT_WORDS and words[0][:1].isalpha()))
    return [starts[i % len(starts)] for i in range(count)]


def text_job(texts: list[str], label: str, shard: Shard) -> JobFile:
    requests = [Request(id=i + 1, index=i, line=i + 1, path=label, format="native", text=text)
                for i, text in enumerate(texts)]
    return _job(requests, label, json.dumps(texts), shard)


def ids_job(prompts: list[list[int]], label: str, shard: Shard) -> JobFile:
    requests = [Request(id=i + 1, index=i, line=i + 1, path=label, format="native", input_ids=array("i", ids))
                for i, ids in enumerate(prompts)]
    return _job(requests, label, json.dumps(prompts), shard)


def _job(requests: list[Request], label: str, content: str, shard: Shard) -> JobFile:
    return JobFile(path=label, format="native", sha256=hashlib.sha256(content.encode()).hexdigest(),
                   num_requests=len(requests), requests=[r for r in requests if shard.selects(r.index)])


def tokenize_job(job: JobFile, *, tokenizer, spec: ModelSpec, max_new_tokens: int, truncate: str,
                 stop: tuple[str, ...]) -> list[PromptTokens]:
    """Every request as token ids, checked against the model's vocabulary and positions."""
    if stop and tokenizer is None:
        raise UserError("--stop needs a tokenizer to decode the output, and this model has none; use --stop-token-ids")
    tokenize = chat_template = None
    if tokenizer is not None:
        def tokenize(text: str) -> list[int]:
            return list(tokenizer(text)["input_ids"])  # special tokens as the model expects (e.g. BOS)

        if getattr(tokenizer, "chat_template", None):
            def chat_template(messages: list[dict]) -> list[int]:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    return check_tokens(job.requests, tokenize=tokenize, vocab_size=spec.vocab_size, max_positions=spec.max_positions,
                        default_max_new_tokens=max_new_tokens, truncate=truncate, chat_template=chat_template)


def print_continuations(prepared: list[PromptTokens], outputs: dict[str, object], stream, limit: int | None) -> None:
    """`prompt -> continuation` (the text, or the ids without a tokenizer) in input order, for a
    run without --output: all of them, or the first `limit` and a count of the rest."""
    shown = prepared if limit is None else prepared[:limit]
    for item in shown:
        prompt = item.request.text if item.request.text is not None else item.request.prompt
        print(f"{prompt!r} -> {outputs[item.request.key]!r}", file=stream)
    if len(prepared) > len(shown):
        print(f"... and {len(prepared) - len(shown)} more (--output FILE writes every result)", file=stream)
