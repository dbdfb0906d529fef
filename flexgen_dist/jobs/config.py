"""A run's configuration: what `python -m flexgen_dist.run` was asked to do, as frozen, typed
records, and the requests that names. The command line builds it in one place (cli/flags.py
`job_config`), every flag checked there; nothing below the command line reads argparse output.
`LLM` is configured by its `ModelSetup` (api/planner.py), the generation by `GenerationFlags`
(resolved against the model's generation_config.json once the model folder is read).

Shards: one input file split over independent runs (`--shard I/N`, or a SLURM array job). Shard I
of N takes the requests whose 0-based position in the file is I mod N (round robin, requests.py
`Shard`); each shard writes its own resumable output, `results.shard-I-of-N.jsonl` for `--output
results.jsonl`, and `python -m flexgen_dist.merge` joins them in input order.

What a run generates from (`job_from_config`): a job file (`--input`, inputs.py), prompts on the
command line (`--prompt`), the bundled example prompts, or random token ids (`--prompt-len`,
FlexGen's benchmark shape). Each becomes a `JobFile` of `Request`s, so all four go through the same
checks, blocks, resume log and output rows; and `tokenize_job` checks every prompt against the
model before it loads.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..api.generation import RunSettings
from ..api.planner import ModelSetup
from ..errors import UserError
from ..planning.policy import check_block
from ..spec.checks import NAME as GENERATION_CONFIG, GenerationDefaults
from ..spec.model import ModelSpec
from .inputs import JobFile, read_job_file
from .requests import PromptTokens, Request, Shard, check_text, check_tokens

BUNDLED_TEXT = Path(__file__).resolve().parents[1] / "data" / "heldout.txt"
DEFAULT_NUM_PROMPTS = 256  # the default run: enough work for its throughput line to mean something
PROMPT_WORDS = 8  # each bundled prompt: the first words of a paragraph of the held-out text
SHOWN = 4  # continuations printed by a run without --output, beyond which a count is printed
PROMPT_FLAG, BUNDLED, RANDOM = "--prompt", "bundled prompts", "random prompts"  # JobFile.path of each source
MAX_RANDOM_TOKENS = 1 << 24  # random prompt tokens made up for a benchmark (held as Python lists)

# Flags that change what ranks send each other or compute; capacities, paths and logging may
# differ per node. (Generation settings, the input and the model are compared as themselves.)
SCHEDULE_FLAGS = ("policy", "percent", "gpu_batch_size", "num_gpu_batches", "max_latency", "stage_layers",
                  "compute_dtype", "cache_dtype", "allow_compression", "compress_weight", "compress_cache",
                  "compress_bits", "compress_group_size", "compress_weight_method", "compress_cache_method",
                  "compress_cache_window",
                  "attn_sparsity", "cpu_cache_compute", "comm_backend",
                  "num_prompts", "prompt_len", "truncate")


@dataclass(frozen=True)
class GenerationFlags:
    """The generation flags as given (None: the model's generation_config.json, else the built-in default)."""

    max_new_tokens: int = 32
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def settings(self, generation: GenerationDefaults | None = None) -> RunSettings:
        """The run's generation settings: the flags given, else the model's generation_config.json."""
        sampling = (generation or GenerationDefaults(())).sampling(
            do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        if sampling["do_sample"] and sampling["temperature"] == 0:
            raise UserError(f"sampling with the temperature 0 of {GENERATION_CONFIG}: give --temperature T > 0, "
                            f"or --no-do-sample")
        return RunSettings(max_new_tokens=self.max_new_tokens, do_sample=sampling["do_sample"],
                           temperature=sampling["temperature"], top_k=sampling["top_k"], top_p=sampling["top_p"],
                           seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                           ignore_eos=self.ignore_eos, from_model=sampling["from_file"])


@dataclass(frozen=True)
class JobConfig:
    """One run of the `run` command: its model, requests, outputs, generation and placement."""

    model: str
    setup: ModelSetup
    """How the model is placed and run (policy or what the planner may choose, capacities,
    runtime, offload folder); sized for the job's prompts once they are read."""
    generation: GenerationFlags = field(default_factory=GenerationFlags)
    input: str | None = None
    prompts: tuple[str, ...] = ()
    output: str | None = None
    overwrite: bool = False
    truncate: str = "none"
    shard: str | None = None
    num_prompts: int | None = None
    prompt_len: int | None = None
    block: tuple[int | None, int | None] = (None, None)
    """--gpu-batch-size and --num-gpu-batches as given: the shape of a block of random prompts."""
    trace: str | None = None
    stats_json: str | None = None
    print_policy: bool = False
    quiet: bool = False
    warmup: bool = True
    schedule: tuple[tuple[str, object], ...] = ()
    """The flags that change what ranks send each other or compute (run.py `run_record`: the ranks compare them)."""


def parse_shard(text: str | None, environ: Mapping[str, str]) -> Shard:
    """`--shard I/N` (0 <= I < N) if given, else the SLURM array task of this job, else the whole
    file. `--shard 0/1` runs the whole file even inside an array job (an array used for
    something else, e.g. one model per task)."""
    if text is not None:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise UserError(f"--shard {text!r}: expected I/N with whole numbers, e.g. 0/4 for the first of four shards")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or index >= count:
            raise UserError(f"--shard {text!r}: the index counts from 0 and must be below N (0/{max(count, 1)} .. "
                            f"{max(count, 1) - 1}/{max(count, 1)})")
        return Shard(index=index, count=count)
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return Shard(index=0, count=1)
    return _slurm_array_shard(environ)


def _slurm_array_shard(environ: Mapping[str, str]) -> Shard:
    def read(name: str, default: int | None = None) -> int:
        value = environ.get(name)
        if value is None:
            if default is None:
                raise UserError(f"SLURM_ARRAY_TASK_ID is set but {name} is not; pass --shard I/N")
            return default
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{name}={value!r} is not a whole number; pass --shard I/N") from None

    task_id = read("SLURM_ARRAY_TASK_ID")
    count = read("SLURM_ARRAY_TASK_COUNT")
    first = read("SLURM_ARRAY_TASK_MIN", 0)
    last = read("SLURM_ARRAY_TASK_MAX", first + count - 1)
    step = read("SLURM_ARRAY_TASK_STEP", 1)
    if step != 1 or last - first + 1 != count:
        raise UserError(
            f"SLURM array ids {first}..{last} (step {step}) are not {count} consecutive numbers; submit with "
            f"--array=0-{count - 1} (a %limit is fine), or pass --shard I/N"
        )
    index = task_id - first
    if not 0 <= index < count:
        raise UserError(f"SLURM_ARRAY_TASK_ID={task_id} is outside {first}..{last}; pass --shard I/N")
    return Shard(index=index, count=count)


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


def shown_without_output(job: JobFile) -> int | None:
    """Continuations a run without --output prints: every --prompt, the first few bundled ones,
    none of random token ids (a benchmark)."""
    return {PROMPT_FLAG: None, RANDOM: 0}.get(job.path, SHOWN)


def tokenize_job(job: JobFile, *, tokenizer, spec: ModelSpec, max_new_tokens: int, truncate: str,
                 stop: tuple[str, ...]) -> list[PromptTokens]:
    """Every request as token ids, checked against the model's vocabulary and positions."""
    if stop and tokenizer is None:
        raise UserError("--stop needs a tokenizer to decode the output, and this model has none; use --stop-token-ids")
    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text)["input_ids"])  # special tokens as the model expects (e.g. BOS)

    def chat_template(messages: list[dict]) -> list[int]:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    has_template = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    return check_tokens(job.requests, tokenize=tokenize if tokenizer is not None else None, vocab_size=spec.vocab_size,
                        max_positions=spec.max_positions, default_max_new_tokens=max_new_tokens, truncate=truncate,
                        chat_template=chat_template if has_template else None)
