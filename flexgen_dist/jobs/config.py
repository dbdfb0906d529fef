"""A run's configuration: what `python -m flexgen_dist.run` was asked to do, as frozen, typed
records. The command line builds it in one place (cli/flags.py `job_config`), every flag checked
there; nothing below the command line reads argparse output. `LLM` is configured by its
`ModelSetup` (api/planner.py), the generation by `GenerationFlags` (resolved against the
model's generation_config.json once the model folder is read)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..api.generation import RunSettings
from ..api.planner import ModelSetup
from ..errors import UserError
from ..spec.generation import NAME as GENERATION_CONFIG, GenerationDefaults


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
    """The flags that change what ranks send each other or compute (identity.py `agree` compares them)."""
