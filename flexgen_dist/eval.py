"""`python -m flexgen_dist.eval`: perplexity of a model on a text, through our engine and policy.

The text (default: the held-out documentation that ships with the package) is tokenized as one
string without special tokens and cut into non-overlapping windows of `--window` tokens; each
window is scored on its own (its first token is context only), and

    perplexity = exp(total negative log-likelihood / number of predicted tokens).

Any policy (and later any compression) can be compared with the plain result this way. The last
line printed is `perplexity: X`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .cli.shell import refuse_too_little_memory

refuse_too_little_memory()  # before torch is imported (below)

from . import DEFAULT_MODEL
from .errors import UserError
from .files import describe_kind
from .api.llm import LLM
from .api.model_source import ModelSource
from .planning.placement import Workload
from .cli.flags import add_model_args, dist_from_args, group, new_parser, setup_from_args
from .cli.shell import exit_process, run_command

DEFAULT_TEXT = str(Path(__file__).parent / "data" / "heldout.txt")
MIN_TOKENS = 2  # a window's first token is context only: two tokens score one


def read_text(path: Path) -> str:
    """The text to score, or a `UserError` naming the file (and the first bad byte's offset)."""
    if not path.exists():
        raise UserError(f"text file {str(path)!r} does not exist")
    if not path.is_file():  # a FIFO or /dev/zero would block or never end
        raise UserError(f"text file {str(path)!r} is {describe_kind(path.stat().st_mode)}; give a regular text file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read text file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"text file {str(path)!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                        f"{exc.start} cannot be decoded); convert it to UTF-8, e.g. with iconv -t utf-8") from None


def windows(ids: list[int], window: int, max_tokens: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `window` tokens (the last one may be shorter, >= MIN_TOKENS)."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    out = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= MIN_TOKENS]


def perplexity(scores: list[list[float]]) -> tuple[float, int]:
    """(perplexity, predicted tokens) from per-token log-probabilities."""
    count = sum(len(s) for s in scores)
    if count == 0:
        raise UserError("the text is too short to score: it needs at least two tokens")
    nll = -sum(sum(s) for s in scores)
    return math.exp(nll / count), count


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("python -m flexgen_dist.eval", __doc__.splitlines()[0])
    add_model_args(parser, DEFAULT_MODEL)
    text = group(parser, "prompts and output")
    text.add_argument("--text", default=None, metavar="FILE", help="UTF-8 text file (default: the bundled held-out text)")
    text.add_argument("--window", type=int, default=512, metavar="N",
                      help="tokens per scored window, at most the model's positions")
    text.add_argument("--max-tokens", type=int, default=None, metavar="N",
                      help="score only the first N tokens of the text (default: all of it)")
    text.add_argument("--through-cache", action="store_true",
                         help="score one decode step at a time, each prediction reading the KV cache as generation "
                              "does: shows a compressed or 16-bit cache and sparse attention, which scoring a whole "
                              "window at once (the default) never reads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _eval(args))


def _eval(args: argparse.Namespace) -> int:
    ctx = dist_from_args(args)
    if ctx.world_size > 1:
        raise UserError("eval runs in one process; start it without torchrun / mpirun")
    if args.max_tokens is not None and args.max_tokens < MIN_TOKENS:
        raise UserError(f"--max-tokens must be at least {MIN_TOKENS} (a scored token needs one before it), "
                        f"got {args.max_tokens}; leave it out to score the whole text")
    text_path = Path(args.text or DEFAULT_TEXT)
    text = read_text(text_path)
    source = ModelSource.from_path(args.model)
    if source.tokenizer is None:
        raise UserError(f"model {args.model!r} has no tokenizer, so it cannot score text")
    window = min(args.window, source.spec.max_positions)
    if window < 2:
        raise UserError(f"--window must be at least 2, got {args.window}")
    ids = list(source.tokenizer(text, add_special_tokens=False)["input_ids"])
    chunks = windows(ids, window, args.max_tokens)
    if not chunks:
        raise UserError(f"text file {str(text_path)!r} is {len(ids)} token{'' if len(ids) == 1 else 's'} long; "
                        f"scoring needs at least {MIN_TOKENS} (a scored token needs one before it): give a longer text")
    # the plan is for these windows: as many prompts, each as long as a window, scored (no new
    # tokens); or, through the cache, each a one-token prompt followed by the rest fed step by step
    longest = max(len(c) for c in chunks)
    workload = Workload(1, longest - 1) if args.through_cache else Workload(longest, 1)
    # scored whole, the head's logits of every window position count in the plan
    setup = setup_from_args(args, ctx).for_workload(workload, num_prompts=len(chunks), scoring=not args.through_cache)
    if args.print_policy:
        print(setup.plan(source.spec).summary())
        return 0
    llm = LLM(source, **setup.llm_kwargs())
    try:
        scores = llm.score(chunks, through_cache=args.through_cache)
    finally:
        llm.close()
    ppl, count = perplexity(scores)
    how = ", one decode step at a time" if args.through_cache else ""
    print(f"scored {count} tokens in {len(chunks)} windows of up to {window} tokens from {text_path.name}{how}")
    print(f"perplexity: {ppl:.4f}")
    return 0


if __name__ == "__main__":
    exit_process(main())
