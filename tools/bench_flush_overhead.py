"""What saving results after every block costs: the same job on the same loaded model, with the
resume log (each block's lines appended and fsynced as it closes, as `--output FILE` does) and
without (results kept in memory), alternated so that both see the same machine load.

    python tools/bench_flush_overhead.py [--model DIR] [--prompts 64] [--max-new-tokens 32]
        [--gpu-batch-size 4] [--repeats 5] [--folder DIR]

Prints the median throughput of each and their ratio, the median time of one append + fsync,
and the share of each saved run's generation time spent appending (measured inside that run,
so it holds even on a machine whose load changes from run to run).
`--folder` is where the output goes (default: a temporary folder): the fsync costs what that
disk makes it cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from flexgen_dist import DEFAULT_MODEL, LLM, Policy, Runtime
from flexgen_dist.api.generation import RunSettings
from flexgen_dist.jobs.config import bundled_prompts, text_job, tokenize_job
from flexgen_dist.jobs.outputs import output_row, RunIdentity
from flexgen_dist.jobs.resume import open_for_resume
from flexgen_dist.jobs.requests import Shard


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--gpu-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args(argv)
    settings = RunSettings(max_new_tokens=args.max_new_tokens)
    with LLM(args.model, policy=Policy(gpu_batch_size=args.gpu_batch_size), runtime=Runtime(device="cpu")) as llm:
        job = text_job(bundled_prompts(args.prompts), "bundled prompts", Shard(index=0, count=1))
        prepared = tokenize_job(job, tokenizer=llm.tokenizer, spec=llm.spec, max_new_tokens=args.max_new_tokens,
                                truncate="none", stop=())
        llm.generate_requests(prepared[:4], settings, lambda items: None)  # warm-up
        with tempfile.TemporaryDirectory(dir=args.folder) as folder:
            plain, saved, appends, shares = [], [], [], []
            for repeat in range(args.repeats):
                stats = llm.generate_requests(prepared, settings, lambda items: None)
                plain.append(stats.tokens_per_s)
                log = open_for_resume(Path(folder) / f"out{repeat}.jsonl", RunIdentity("m", job.sha256, settings.record()))

                def save(items, log=log):
                    started = time.perf_counter()
                    log.append([output_row(p.request, c, model_name="m", created=log.started_at) for p, c in items])
                    appends.append(time.perf_counter() - started)

                before = len(appends)
                stats = llm.generate_requests(prepared, settings, save)
                log.finish(job.keys)
                saved.append(stats.tokens_per_s)
                shares.append(sum(appends[before:]) / stats.total_s)
    without, with_log = statistics.median(plain), statistics.median(saved)
    print(f"model {Path(args.model).name}, {args.prompts} prompts x {args.max_new_tokens} new tokens, blocks of "
          f"{args.gpu_batch_size} ({stats.num_blocks} blocks a run), {args.repeats} alternating repeats")
    print(f"without the resume log: {without:.1f} tok/s (median; runs {', '.join(f'{x:.0f}' for x in plain)})")
    print(f"with the resume log:    {with_log:.1f} tok/s (median; runs {', '.join(f'{x:.0f}' for x in saved)})")
    print(f"ratio {with_log / without:.3f}; one block's append + fsync: median {statistics.median(appends) * 1e3:.2f} ms, "
          f"max {max(appends) * 1e3:.2f} ms; {statistics.median(shares):.2%} of a saved run's time (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
