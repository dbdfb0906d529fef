"""`python -m flexgen_dist.run` (also `python -m flexgen_dist`, `flexgen-dist`): batch generation
from the command line.

Without arguments it runs the bundled model on 256 prompts from its held-out text, prints the
policy it chose, the first continuations and a summary line with prefill, decode and total
throughput. `--input FILE.jsonl --output FILE.jsonl` runs a job: validated before the model
loads, results saved as blocks finish, resumed by running the same command again.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: hold a SIGINT / SIGTERM sent while the imports below take seconds
    from .cli.shell import HeldSignals
    from .cli.streams import hold_standard_descriptors

    HeldSignals.install()
    hold_standard_descriptors()  # a closed descriptor 1 must not become the next file opened

import argparse

from .cli.shell import refuse_too_little_memory

refuse_too_little_memory()  # before torch is imported (below)

from . import DEFAULT_MODEL, __version__
from .cli.flags import add_model_args, dist_from_args, group, job_config, new_parser, start_pipeline
from .cli.shell import StopSignals, exit_process, run_command
from .jobs.run import run_job

DESCRIPTION = """\
Batch generation with a model whose weights and KV cache may not fit in GPU memory.
A job (--input, --output) is checked whole before the model loads, saves its results as
blocks finish, and resumes when the same command runs again after a crash or Ctrl-C."""
EPILOG = """\
examples:
  python -m flexgen_dist.run                                  the bundled model on 256 bundled prompts
  python -m flexgen_dist.run --prompt "Return the number of"   a one-off prompt
  python -m flexgen_dist.run --model DIR --input jobs.jsonl --output results.jsonl
                                                              a job; run it again to resume
  python -m flexgen_dist.run --model DIR --input jobs.jsonl --output results.jsonl --shard 0/4
                                                              a quarter of it (then python -m flexgen_dist.merge)
exit codes: 0 done, 1 the environment failed (disk, a peer rank), 2 bad input or flags,
130 / 143 stopped by SIGINT / SIGTERM (finished results are kept: run it again to resume),
141 standard output's reader went away (a broken pipe; saved results are kept, as for a signal)."""


def token_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token ids, e.g. 13,42") from None


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("python -m flexgen_dist.run", DESCRIPTION, EPILOG)
    add_model_args(parser, DEFAULT_MODEL)
    io = group(parser, "prompts and output")
    io.add_argument("--input", metavar="FILE.jsonl",
                    help='the job: one JSON object a line, {"id", "prompt"} or {"id", "input_ids"} with optional '
                         "max_new_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids; or OpenAI / vLLM "
                         "batch lines (default: --prompt, else the bundled prompts)")
    io.add_argument("--prompt", action="append", metavar="TEXT",
                    help="a prompt for a one-off run; repeat for several (their continuations are printed; "
                         "default: none, the bundled prompts run without --input)")
    io.add_argument("--output", metavar="FILE.jsonl",
                    help="results, one line per prompt in input order, written as blocks finish and resumed by the "
                         "same command; - for standard output (default: print the continuations; --input needs one)")
    io.add_argument("--overwrite", action="store_true",
                    help="start over: replace --output and drop an unfinished run's saved results")
    io.add_argument("--truncate", choices=("none", "left"), default="none",
                    help="a prompt too long for the model's positions: an error (none), or cut from the left")
    io.add_argument("--shard", metavar="I/N",
                    help="run shard I of N (0-based) of the input into OUTPUT.shard-I-of-N.jsonl; join the shards "
                         "with python -m flexgen_dist.merge (default: the SLURM array task, else the whole input)")
    io.add_argument("--num-prompts", type=int, default=None, metavar="N",
                    help="without --input or --prompt: how many prompts (default: 256 bundled prompts; one block of "
                         "random ones with --prompt-len)")
    io.add_argument("--prompt-len", type=int, default=None, metavar="N",
                    help="without --input or --prompt: random prompts of N tokens, FlexGen's benchmark shape "
                         "(default: the bundled text prompts; random prompts of 32 tokens without a tokenizer)")
    gen = group(parser, "generation")
    gen.add_argument("--max-new-tokens", "--gen-len", dest="max_new_tokens", type=int, default=32, metavar="N",
                     help="new tokens per prompt, at most (a job line's max_new_tokens overrides it)")
    gen.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                     help="sample instead of greedy decoding, or not (a job line with a temperature decides for "
                          "itself; default: the model's generation_config.json, else greedy)")
    gen.add_argument("--temperature", type=float, default=None, metavar="T",
                     help="softmax temperature when sampling (default: generation_config.json's, else 1)")
    gen.add_argument("--top-k", type=int, default=None, metavar="K",
                     help="sample among the K most likely tokens (0: all; default: generation_config.json's, else 0)")
    gen.add_argument("--top-p", type=float, default=None, metavar="P",
                     help="sample among the most likely tokens whose probabilities add up to P (1: all; default: "
                          "generation_config.json's, else 1)")
    gen.add_argument("--seed", type=int, default=0, metavar="S",
                     help="sampling seed; each prompt draws from (S, its index in the input), so a result does not "
                          "depend on its block, on a resume or on sharding")
    gen.add_argument("--stop", action="append", metavar="TEXT",
                     help="a string that ends a sequence (not included in the text); repeat for several "
                          "(default: none; EOS always ends one)")
    gen.add_argument("--stop-token-ids", type=token_ids, default=None, metavar="ID,ID",
                     help="token ids that end a sequence besides EOS, comma-separated (default: none)")
    gen.add_argument("--ignore-eos", action="store_true", help="generate --max-new-tokens even past EOS (benchmarks)")
    diag = group(parser, "diagnostics")
    diag.add_argument("--quiet", "-q", action="store_true",
                      help="no progress bar (or progress lines without a terminal); the start and summary lines stay")
    diag.add_argument("--no-warmup", action="store_true", help="skip the short untimed warm-up run")
    diag.add_argument("--trace", metavar="FILE.json",
                      help="write a Chrome/Perfetto trace of every op; rank r > 0 writes FILE.rank<r>.json (default: none)")
    diag.add_argument("--stats-json", metavar="FILE",
                      help="also write the run's statistics and policy as JSON (rank 0; default: none)")
    diag.add_argument("--version", action="version", version=f"flexgen_dist {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    contexts = []

    def body() -> int:
        with StopSignals() as signals:
            contexts.append(dist_from_args(args))
            with start_pipeline(args, contexts[0]) as pipeline:
                return run_job(lambda: job_config(args, contexts[0]), contexts[0], pipeline, signals)

    return run_command(body, rank_of=lambda: contexts[0].rank if contexts else 0)


def cli() -> None:
    """The `flexgen-dist` command (pyproject's script): main's exit code, the process ended as
    exit_process ends it."""
    exit_process(main())


if __name__ == "__main__":
    cli()
