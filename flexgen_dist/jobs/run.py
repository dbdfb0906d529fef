"""One run of `python -m flexgen_dist.run`: requests in, results out, resumable.

Everything a user can get wrong fails before the weights load:
1. the requests: the job file read and validated whole (or --prompt, or the bundled prompts);
2. the model's config and tokenizer: every prompt tokenized and checked against the model;
3. rank 0 opens the output's resume log (it refuses another run's progress) and tells the other
   ranks which requests are left (they hold no lock and write nothing);
4. the model loads; one line says the policy, the block shape and where the weights live;
5. the blocks run; each block's results are appended and fsynced as it closes, and a progress
   bar (or a line every 30 s without a terminal) shows prompts done, tokens/s and ETA;
6. the output is written whole in input order; the last line is the summary.
SIGINT / SIGTERM stop the run where it is (cli/shell.py); what is finished is on disk already,
and one line says how to resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..api.generation import RunSettings
from ..api.llm import LLM
from ..api.model_source import ModelSource, model_file_hashes, model_fingerprint
from ..api.results import Output, stats_record
from ..cli.progress import Progress, settings_line, start_line
from ..cli.shell import Interrupted, StopSignals
from ..cli.streams import stdout_closed_at_start
from ..engine.walk import Tracer
from ..errors import EnvironmentFailure, UserError
from ..files import write_json_file
from ..parallel.context import DistContext
from ..parallel.group import Pipeline
from ..planning.placement import Workload
from ..spec.checks import GenerationDefaults
from .config import JobConfig, job_from_config, parse_shard, shown_without_output, tokenize_job
from .inputs import JobFile
from .outputs import STDOUT, RunIdentity, StdoutLog, check_output_path, output_row, progress_paths
from .requests import PromptTokens, Shard, shard_output_path

if TYPE_CHECKING:  # loaded by open_sink, only for a job that writes --output
    from .resume import ResumeLog

Items = list[tuple[PromptTokens, Output]]


class LogSink:
    """Results to --output through the resume log (or to standard output with `-`)."""

    def __init__(self, log: ResumeLog | StdoutLog, job: JobFile, model_name: str):
        self.log, self.job, self.model_name = log, job, model_name
        self.finished = log.finished

    def add(self, items: Items) -> None:
        rows = [output_row(p.request, c, model_name=self.model_name, created=self.log.started_at) for p, c in items]
        try:
            self.log.append(rows)
        except OSError as exc:  # a full or failing disk: what is on disk is kept
            raise EnvironmentFailure(str(exc)) from None

    def finish(self) -> None:
        try:
            self.log.finish(self.job.keys)
        except OSError as exc:
            raise EnvironmentFailure(f"cannot write the output {self.log.output}: {exc.strerror or exc}; finished "
                                     f"results are kept: fix this and {self.log.rerun} to resume") from None

    def close(self) -> None:
        self.log.close()

    def where(self) -> str:
        return "standard output" if isinstance(self.log, StdoutLog) else str(self.log.output)

    def interrupted(self, name: str) -> str:
        if isinstance(self.log, StdoutLog):
            return f"interrupted by {name}; results were not saved (give --output FILE to make a run resumable)"
        return (f"interrupted by {name}: {len(self.finished)} of {len(self.job.requests)} results are saved in "
                f"{progress_paths(self.log.output)[0]}; {self.log.rerun} to resume")


class PrintSink:
    """No --output: `prompt -> continuation` lines at the end (`limit` of them; 0: none)."""

    def __init__(self, prepared: list[PromptTokens], stream, limit: int | None):
        self.prepared, self.stream, self.limit = prepared, stream, limit
        self.outputs: dict[str, object] = {}
        self.finished = frozenset()

    def add(self, items: Items) -> None:
        for p, c in items:
            self.outputs[p.request.key] = c.text if c.text is not None else list(c.output_ids)

    def finish(self) -> None:
        if self.limit != 0:
            print_continuations(self.prepared, self.outputs, self.stream, self.limit)

    def close(self) -> None:
        pass

    def where(self) -> str:
        return "standard output"

    def interrupted(self, name: str) -> str:
        return f"interrupted by {name}; results were not saved (give --output FILE to make a run resumable)"


@dataclass(frozen=True)
class JobStart:
    """A job checked whole before anything loads: its model, settings, requests and output."""

    shard: Shard
    source: ModelSource
    settings: RunSettings
    job: JobFile
    target: str | None
    prepared: list[PromptTokens]

    config: JobConfig

    def record(self) -> dict[str, str]:
        """What the ranks of a pipeline compare before they compute (parallel/group.py `agree`)."""
        return run_record(source=self.source, settings={**self.settings.record(), "output_format": self.job.format},
                          input_sha256=self.job.sha256, shard=str(self.shard), flags=dict(self.config.schedule))


def start_job(config: JobConfig, ctx: DistContext) -> JobStart:
    shard = parse_shard(config.shard, os.environ)
    source = ModelSource.from_path(config.model)
    settings = config.generation.settings(source.generation)
    outside = [i for i in settings.stop_token_ids if not 0 <= i < source.spec.vocab_size]
    if outside:
        raise UserError(f"--stop-token-ids: {outside[0]} is outside the model's vocabulary (ids 0 to "
                        f"{source.spec.vocab_size - 1})")
    job = job_from_config(config, source.spec, source.tokenizer is not None, shard)
    target = output_target(config, shard)
    check_side_files(input=config.input, trace=config.trace, stats_json=config.stats_json, output=target,
                     world_size=ctx.world_size)
    prepared = tokenize_job(job, tokenizer=source.tokenizer, spec=source.spec, max_new_tokens=settings.max_new_tokens,
                            truncate=config.truncate, stop=settings.stop)
    return JobStart(shard, source, settings, job, target, prepared, config)


def run_job(make_config: Callable[[], JobConfig], ctx: DistContext, pipeline: Pipeline, signals: StopSignals) -> int:
    """The run. `make_config` builds (and checks) the configuration inside the ranks' agreement,
    so a rank's bad flag stops every rank with its one line."""
    start = pipeline.agree(lambda: start_job(make_config(), ctx), JobStart.record)
    shard, source, settings, job, target, prepared, config = (
        start.shard, start.source, start.settings, start.job, start.target, start.prepared, start.config)
    workload = None
    if prepared:  # plan for these prompts (a shard may have none)
        workload = Workload(max(len(p.prompt_ids) for p in prepared), max(p.max_new_tokens for p in prepared))
    setup = config.setup.for_workload(workload, num_prompts=len(prepared) or None)
    info = sys.stderr if target == "-" else sys.stdout  # standard output may carry the results
    plan = setup.plan(source.spec, pipeline)
    if config.print_policy:
        if ctx.rank == 0:
            print(plan.summary(), file=info)
        return 0
    sinks: list[LogSink | PrintSink] = []

    def open_output() -> list[int]:  # rank 0 only: it alone holds the output's lock
        identity = RunIdentity(
            model=model_fingerprint(source, dtypes=plan.placement.dtypes,
                                    policy=plan.placement.policy),
            input_sha256=job.sha256, settings={**settings.record(), "truncate": config.truncate},
            shard=str(shard), output_format=job.format)
        sinks.append(open_sink(config, target, identity, job, prepared))
        if isinstance(sinks[0], LogSink) and not isinstance(sinks[0].log, StdoutLog):
            sinks[0].log.check_ids(job.keys, config.input)  # saved results of ids the input lacks: refused now
            # merge checks that one run made every shard; the same command run again finds it complete
            sinks[0].log.keep_provenance(identity)
        return [i for i, p in enumerate(prepared) if p.request.key not in sinks[0].finished]

    try:
        pending = pipeline.share_from_rank0(open_output)
        if not pending:
            if sinks:
                with signals.deferred():
                    sinks[0].finish()
                print(f"already complete: {len(prepared)} results in {sinks[0].where()}", file=info)
            return 0
        tracer = Tracer(pid=ctx.rank) if config.trace else None
        llm = LLM(source, plan=plan, runtime=setup.runtime, offload_dir=setup.offload_dir, pipeline=pipeline,
                  tracer=tracer)
        try:
            if sinks:
                generation = source.generation or GenerationDefaults(source.spec.eos_token_ids)
                print(f"{start_line(llm, ctx.world_size, setup.offload_dir)}; "
                      f"{settings_line(settings, source.spec.eos_token_ids, generation.source)}", file=info, flush=True)
            stats = _generate(config, llm, [prepared[i] for i in pending], settings, sinks, signals,
                              finished=len(prepared) - len(pending), total=len(prepared), tracer=tracer)
        finally:
            llm.close()
        if tracer is not None:
            write_json_file(trace_path(config.trace, ctx.rank), tracer.document(), flag="--trace",
                            indent=None)
        if not sinks:
            return 0  # rank 0 alone writes results and prints the summary
        with signals.deferred():
            sinks[0].finish()
        if config.stats_json:
            write_json_file(config.stats_json, stats_record(stats, llm.policy, ctx.world_size, plan=llm.plan),
                            flag="--stats-json")
        if len(pending) < len(prepared):
            print(f"resumed: {len(prepared) - len(pending)} of {len(prepared)} results came from an earlier run", file=info)
        if target is not None:
            print(f"output: {len(prepared)} results in {sinks[0].where()}", file=info)
        print(f"throughput: {stats.summary()}", file=info, flush=True)
        return 0
    except Interrupted as exc:
        raise exc.with_message(sinks[0].interrupted(exc.name)) if sinks else exc
    finally:
        for sink in sinks:
            sink.close()


def _generate(config: JobConfig, llm: LLM, todo: list[PromptTokens], settings: RunSettings, sinks: list, signals: StopSignals, *,
              finished: int, total: int, tracer: Tracer | None):
    if config.warmup:  # first calls pay torch's lazy initialisation; keep it out of the timing
        llm.generate([list(todo[0].prompt_ids)], max_new_tokens=min(2, settings.max_new_tokens))
        if tracer is not None:
            tracer.reset()
    progress = Progress(total=total, initial=finished, stream=sys.stderr, enabled=bool(sinks) and not config.quiet)

    def on_results(items: Items) -> None:  # a block closed (rank 0)
        with signals.deferred():  # a signal waits until the block's lines are on disk
            sinks[0].add(items)
        progress.update(len(items), sum(len(c.output_ids) for _, c in items))

    try:
        return llm.generate_requests(todo, settings, on_results)
    finally:
        progress.close()


def output_target(config: JobConfig, shard) -> str | None:
    """This shard's output path; None: print continuations (a run without --input)."""
    if config.output is None:
        if config.input is not None:
            raise UserError("--input needs --output FILE (results are saved as blocks finish, and the same command "
                            "resumes after a crash) or --output - (standard output, at the end)")
        if config.overwrite:
            raise UserError("--overwrite replaces an --output file; give --output FILE")
        return None
    return shard_output_path(config.output, shard)


def open_sink(config: JobConfig, target: str | None, identity: RunIdentity, job: JobFile, prepared: list[PromptTokens]):
    if target in (None, STDOUT) and stdout_closed_at_start():
        flag = "--output -" if target == STDOUT else "a run without --output (it prints the continuations)"
        raise UserError(f"standard output is closed (>&-), so {flag} has nowhere to put the results; give "
                        f"--output FILE, or send standard output to a file or /dev/null")
    if target is None:
        return PrintSink(prepared, sys.stdout, shown_without_output(job))
    from .resume import open_for_resume  # only a job with --output keeps a resume log

    try:
        log = open_for_resume(target, identity, overwrite=config.overwrite, input_path=config.input, stream=sys.stdout)
    except OSError as exc:
        raise EnvironmentFailure(f"cannot open --output {target!r}: {exc.strerror or exc}") from None
    return LogSink(log, job, model_name=Path(config.model).name)


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_record(*, source, settings: dict, input_sha256: str, shard: str, flags: dict) -> dict[str, str]:
    """What every rank must hold alike, in the order differences are reported: short digests
    (a rank's record crosses the wire) with enough of the value to say what differs."""
    return {
        "model configuration (config.json)": _digest(source.spec.raw),
        "model files (tokenizer, generation config)": _digest(model_file_hashes(Path(source.name))),
        "weights": source.weights.content_digest()[:16],
        "input": input_sha256[:16],
        "shard": shard,
        "generation settings": json.dumps(settings, sort_keys=True),
        **{f"--{name.replace('_', '-')}": json.dumps(value) for name, value in sorted(flags.items())},
    }


def trace_path(trace: str, rank: int) -> str:
    """Rank 0 writes `--trace FILE.json` itself; rank r > 0 writes FILE.rank<r>.json beside it."""
    if rank == 0 or not trace:
        return trace
    path = Path(trace)
    return str(path.with_suffix(f".rank{rank}{path.suffix}"))


def check_side_files(*, input: str | None, trace: str | None, stats_json: str | None, output: str | None,
                     world_size: int) -> None:
    """Refuse, before anything is read or written, a side file (`--trace`: one per rank,
    `trace_path`; `--stats-json`) that cannot be written or that names a file the run reads or
    writes for another purpose. Every rank checks every rank's files, so all ranks stop on the
    same error (only rank 0 prints it)."""
    taken: list[tuple[str, str]] = []
    if input is not None:
        taken.append(("the --input file", input))
    if output is not None and output != STDOUT:
        partial, record = progress_paths(output)
        taken += [("the --output file", output), ("the output's progress file", str(partial)),
                  ("the output's run record", str(record))]
    side = [("--trace", trace_path(trace, rank)) for rank in range(world_size)] if trace is not None else []
    side += [("--stats-json", stats_json)] if stats_json is not None else []
    for flag, path in side:
        check_output_path(path, input_path=input, flag=flag, allow_stdout=False)
        for what, other in taken:
            if same_file(path, other):
                raise UserError(f"{flag} {path!r} is {what}; give {flag} a file of its own")
        taken.append((f"the {flag} file", path))


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same path once links in folders are resolved, or
    (both existing) the same inode, e.g. a hard link."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def print_continuations(prepared: list[PromptTokens], outputs: dict[str, object], stream, limit: int | None) -> None:
    """`prompt -> continuation` (the text, or the ids without a tokenizer) in input order, for a
    run without --output: all of them, or the first `limit` and a count of the rest."""
    shown = prepared if limit is None else prepared[:limit]
    for item in shown:
        prompt = item.request.text if item.request.text is not None else item.request.prompt
        print(f"{prompt!r} -> {outputs[item.request.key]!r}", file=stream)
    if len(prepared) > len(shown):
        print(f"... and {len(prepared) - len(shown)} more (--output FILE writes every result)", file=stream)
