"""The run command as a job, in process: every bad input is one line naming file and line with
exit code 2 before the model loads; resuming another run is refused; the OpenAI batch format
round-trips; shards merge into the whole run; the help explains every flag; progress lines."""

import errno
import io
import os
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flexgen_dist import __version__
from flexgen_dist.jobs import run as job_module
from flexgen_dist.cli.progress import Progress
from flexgen_dist.jobs.resume import ResumeLog
from flexgen_dist.jobs.outputs import progress_paths
from flexgen_dist.cli.shell import Interrupted
from flexgen_dist.run import build_parser, main

REPO = Path(__file__).resolve().parents[1]
# --device cpu: fp32, so outputs compared across block shapes and processes are byte for byte
# equal on a GPU machine too (there the default computes on CUDA in 16 bits)
FAST = ["--no-warmup", "--quiet", "--gpu-batch-size", "2", "--device", "cpu"]



def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def one_error_line(code, err, fragment):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert "Traceback" not in err


GOOD = {"id": "a", "input_ids": [5, 6, 7]}
BAD_INPUTS = [
    ([GOOD, {"id": "b", "input_ids": [5]}, {"id": "a", "input_ids": [6]}], 'in.jsonl:3: id "a" is also on line 1'),
    ([GOOD, {"id": "b", "input_ids": [5, 999]}], "in.jsonl:2: prompt holds token id 999, outside"),
    ([{"id": "long", "input_ids": [5] * 120}], "in.jsonl:1: the prompt has 120 tokens + max_new_tokens 16 > the model's 128"),
    ([GOOD, {"id": "x", "input_ids": [5], "max_new_tokens": 200}], "in.jsonl:2: max_new_tokens 200 leaves no room"),
    ([GOOD, '{"id": "b", "input_ids": [1, 2'], "in.jsonl:2: not valid JSON"),
    ([GOOD, {"id": "b"}], "in.jsonl:2: needs a 'prompt' (text) or 'input_ids'"),
    ([GOOD, {"id": "b", "input_ids": [5], "temperature": -1}], "in.jsonl:2: 'temperature' is -1"),
    ([GOOD, {"id": "b", "input_ids": [5], "max_tokens": 4}], "in.jsonl:2: unknown key 'max_tokens'"),
    ([GOOD, {"id": "b", "input_ids": [5], "stop": ["\n"]}], "in.jsonl:2: 'stop' strings need a tokenizer"),
    ([GOOD, {"id": "b", "input_ids": [5], "stop_token_ids": [400]}], "in.jsonl:2: stop_token_ids holds token id 400"),
    ([GOOD, {"id": "b", "prompt": "text"}], "in.jsonl:2: the prompt is text but this model has no tokenizer"),
    ([{"id": i, "input_ids": [5]} for i in range(89)] + [{"id": 89, "input_ids": [5], "seed": -1}],
     "in.jsonl:90: 'seed' is -1"),  # a typo deep in the file surfaces before anything runs
]


@pytest.mark.parametrize("rows, fragment", BAD_INPUTS)
def test_every_bad_input_is_one_line_with_file_and_line(cli, llama_dir, tmp_path, rows, fragment):
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    one_error_line(*cli("--model", llama_dir, "--input", src, "--output", out, "--max-new-tokens", 16, *FAST)[::2], fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing written, nothing ran


@pytest.mark.parametrize("args, fragment", [
    (["--max-new-tokens", 0], "--max-new-tokens must be >= 1"),
    (["--do-sample", "--temperature", 0], "--temperature must be a finite number > 0"),
    (["--do-sample", "--temperature", "nan"], "--temperature must be a finite number > 0"),
    (["--do-sample", "--temperature", "inf"], "--temperature must be a finite number > 0"),
    (["--stop-token-ids", "999999"], "--stop-token-ids: 999999 is outside the model's vocabulary"),
    (["--policy", "manual", "--max-latency", 5], "--max-latency guides the planner, but --policy manual"),
    (["--percent", 100, 0, 100, 0, 100, 0, "--allow-compression"], "--allow-compression guides the planner, but --percent"),
    (["--comm-timeout", 0], "--comm-timeout must be a positive number"),
    (["--comm-timeout", "nan"], "--comm-timeout must be a positive number"),
    (["--io-threads", 1000], "--io-threads must be between 1 and 64"),
    (["--prefetch-depth", 10**9], "--prefetch-depth must be between 1 and 64"),
    (["--policy", "manual", "--num-gpu-batches", 10**9], "is past the limits"),
    (["--num-gpu-batches", 10**9], "is past the limits"),  # before a block of random prompts is made up
    (["--num-prompts", 10**9, "--prompt-len", 8], "random tokens is past the"),
    (["--input", "IN"], "--input needs --output FILE"),
    (["--input", "IN", "--prompt", "hi", "--output", "OUT"], "not both"),
    (["--input", "IN", "--output", "OUT", "--shard", "4/4"], "--shard '4/4'"),
    (["--input", "IN", "--output", "OUT", "--prompt-len", 8], "--num-prompts and --prompt-len"),
    (["--stop", "x"], "--stop needs a tokenizer"),
])
def test_bad_flags_are_one_line(cli, llama_dir, tmp_path, args, fragment):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    args = [str(tmp_path / "out.jsonl") if a == "OUT" else src if a == "IN" else a for a in args]
    one_error_line(*cli("--model", llama_dir, *args, *FAST)[::2], fragment)


@pytest.mark.parametrize("module, args, fragment", [
    ("run", ["--gpu-batch-size", "1.5"], "argument --gpu-batch-size: invalid int value"),
    ("run", ["--percent", "1", "2"], "argument --percent: expected 6 arguments"),
    ("merge", [], "the following arguments are required"),
    ("bench", ["--gen-len", "x"], "argument --gen-len: invalid int value"),
])
def test_a_flag_the_parser_refuses_is_one_line_too(module, args, fragment):
    proc = subprocess.run([sys.executable, "-m", f"flexgen_dist.{module}", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    one_error_line(proc.returncode, proc.stderr, fragment)
    assert f"flexgen_dist.{module} --help" in proc.stderr


def test_truncate_left_runs_what_is_too_long(cli, llama_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "long", "input_ids": list(range(4, 124))}])
    out = tmp_path / "out.jsonl"
    code, stdout, err = cli("--model", llama_dir, "--input", src, "--output", out, "--max-new-tokens", 16,
                            "--truncate", "left", *FAST)
    assert code == 0, err
    row = json.loads(out.read_text())
    assert row["usage"]["prompt_tokens"] == 128 - 16 and len(row["output_ids"]) == 16


def run_ids_job(cli, model, src, out, *extra):
    code, stdout, err = cli("--model", model, "--input", src, "--output", out, "--max-new-tokens", 6, *FAST, *extra)
    assert code == 0, err
    return stdout


def test_resuming_another_run_is_refused_and_overwrite_starts_over(cli, llama_dir, tiny_models_cache, tmp_path,
                                                                   monkeypatch):
    from tiny_models import random_prompts

    other_model = tiny_models_cache["llama-tied"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "input_ids": p}
                                               for i, p in enumerate(random_prompts([3, 9, 5, 7, 4, 6], seed=1))])
    reference = tmp_path / "reference.jsonl"
    stdout = run_ids_job(cli, llama_dir, src, reference)
    assert "% of prompt slots are real tokens" in stdout.splitlines()[-1]
    out = tmp_path / "out.jsonl"
    real_add = job_module.LogSink.add

    def add_then_stop(self, items):  # the run is stopped once its first block is saved
        real_add(self, items)
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(job_module.LogSink, "add", add_then_stop)
    code, _, err = cli("--model", llama_dir, "--input", src, "--output", out, "--max-new-tokens", 6, *FAST)
    monkeypatch.undo()
    assert code == 143 and "interrupted by SIGTERM: 2 of 6 results are saved" in err and "run the same command" in err
    assert len(progress_paths(out)[0].read_text().splitlines()) == 2 and not out.exists()
    code, _, err = cli("--model", llama_dir, "--input", src, "--output", out, "--max-new-tokens", 7, *FAST)
    one_error_line(code, err, "generation settings differ (max_new_tokens: 6 -> 7)")
    assert "--overwrite" in err
    code, _, err = cli("--model", other_model, "--input", src, "--output", out,
                       "--max-new-tokens", 6, *FAST)
    one_error_line(code, err, "the model differs")
    write_jsonl(tmp_path / "other.jsonl", [{"id": 0, "input_ids": [5]}])
    code, _, err = cli("--model", llama_dir, "--input", tmp_path / "other.jsonl", "--output", out,
                       "--max-new-tokens", 6, *FAST)
    one_error_line(code, err, "the input file's content differs")
    stdout = run_ids_job(cli, llama_dir, src, out, "--gpu-batch-size", 3)  # same settings, another block: resumes
    assert "resumed: 2 of 6 results came from an earlier run" in stdout
    assert out.read_bytes() == reference.read_bytes()
    stdout = run_ids_job(cli, llama_dir, src, out, "--overwrite")
    assert "resumed" not in stdout and out.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "other.jsonl", "out.jsonl", "out.jsonl.made-by.json",
                                                          "reference.jsonl", "reference.jsonl.made-by.json"]


def test_a_finished_job_run_again_is_a_no_op_and_other_settings_are_refused(cli, llama_dir, tmp_path):
    """A SLURM requeue or a resubmitted array runs the same command once more: one line, exit 0,
    the output byte for byte (and its modification time) as it was. Other settings, or an output
    changed since, are still refused without --overwrite."""
    from tiny_models import random_prompts

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "input_ids": p}
                                               for i, p in enumerate(random_prompts([3, 9, 5], seed=4))])
    out = tmp_path / "out.jsonl"
    run_ids_job(cli, llama_dir, src, out)
    before, stat = out.read_bytes(), out.stat()
    code, stdout, err = cli("--model", llama_dir, "--input", src, "--output", out, "--max-new-tokens", 6, *FAST)
    assert code == 0, err
    assert "already complete: 3 results in" in stdout and str(out) in stdout
    assert out.read_bytes() == before and out.stat().st_mtime_ns == stat.st_mtime_ns
    assert not any(p.exists() for p in progress_paths(out))
    code, _, err = cli("--model", llama_dir, "--input", src, "--output", out, "--max-new-tokens", 7, *FAST)
    one_error_line(code, err, "was made by another run: generation settings differ (max_new_tokens: 6 -> 7)")
    out.write_bytes(before.replace(b"}", b" }", 1))  # edited by hand since
    code, _, err = cli("--model", llama_dir, "--input", src, "--output", out, "--max-new-tokens", 6, *FAST)
    one_error_line(code, err, "changed since the run that made it finished")
    assert not any(p.exists() for p in progress_paths(out))


def test_a_disk_error_while_saving_is_exit_1_in_one_line(cli, llama_dir, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD, {"id": "b", "input_ids": [8, 9]}])

    def full(self, rows):
        raise OSError(28, "cannot append results to out.jsonl.partial: No space left on device; finished results are kept")

    monkeypatch.setattr(ResumeLog, "append", full)
    code, _, err = cli("--model", llama_dir, "--input", src, "--output", tmp_path / "out.jsonl", *FAST)
    assert code == 1 and "No space left on device" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def plant_link(tmp_path, name):
    (tmp_path / "victim.txt").write_text("precious\n")
    (tmp_path / name).symlink_to(tmp_path / "victim.txt")


@pytest.mark.parametrize("flag", ["--trace", "--stats-json"])
@pytest.mark.parametrize("where, setup, fragment", [
    ("no/such/f.json", None, "does not exist; create it first"),
    ("dir", lambda d: (d / "dir").mkdir(), "is a folder; refusing to write there"),
    ("IN", None, "is the input file"),
    ("OUT", None, "is the --output file"),
    ("OUT.partial", None, "is the output's progress file"),
    ("f.json", lambda d: plant_link(d, "f.json"), "is a symbolic link; refusing to write there"),
    ("-", None, "standard output is not possible here"),
    ("/dev/full", None, "is a device"),
])
def test_a_trace_or_stats_path_that_cannot_be_written_is_refused_before_the_run(cli, llama_dir, tmp_path, flag, where,
                                                                              setup, fragment):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    if setup is not None:
        setup(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    out = tmp_path / "out.jsonl"
    path = {"IN": str(src), "OUT": str(out), "OUT.partial": f"{out}.partial"}.get(where, where)
    path = path if path.startswith(("/", "-")) else str(tmp_path / path)
    code, _, err = cli("--model", llama_dir, "--input", src, "--output", out, flag, path, *FAST)
    one_error_line(code, err, fragment)
    assert flag in err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # nothing written: no output, no progress file, the input and the victim intact


def test_trace_and_stats_json_must_differ(cli, llama_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    same = tmp_path / "s.json"
    one_error_line(*cli("--model", llama_dir, "--input", src, "--output", tmp_path / "out.jsonl", "--trace", same,
                        "--stats-json", same, *FAST)[::2], "is the --trace file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_trace_and_stats_are_written_whole_and_a_full_disk_is_exit_1(cli, llama_dir, tmp_path, monkeypatch):
    from flexgen_dist import files

    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    out, stats, trace = tmp_path / "out.jsonl", tmp_path / "stats.json", tmp_path / "trace.json"
    stats.write_text("an older run's stats\n")  # replaced, not refused: like a compiler's -o
    run_ids_job(cli, llama_dir, src, out, "--stats-json", stats, "--trace", trace)
    assert json.loads(stats.read_text())["generated_tokens"] == 6
    assert any(e["ph"] == "X" for e in json.loads(trace.read_text())["traceEvents"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "out.jsonl.made-by.json", "stats.json", "trace.json"]

    real = files.atomic_output

    def full_disk(path, data, **kwargs):  # writes part of the bytes, then the disk is full
        with real(path) as f:
            f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_atomic", full_disk)  # what write_json_file writes with
    code, _, err = cli("--model", llama_dir, "--input", src, "--output", out, "--overwrite", "--stats-json", stats,
                       *FAST)
    assert code == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot write --stats-json" in lines[0] and "No space left on device" in lines[0]
    assert json.loads(stats.read_text())["generated_tokens"] == 6  # the old file stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "out.jsonl.made-by.json", "stats.json", "trace.json"]


def test_openai_batch_round_trip_and_native_agree(cli, tmp_path):
    prompts = ["Return the number of", "This module provides", "If the optional argument"]
    openai = write_jsonl(tmp_path / "batch.jsonl", [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "mine", "prompt": p, "max_tokens": 5 + i, "temperature": 0}} for i, p in enumerate(prompts)])
    native = write_jsonl(tmp_path / "native.jsonl", [{"id": i, "prompt": p, "max_new_tokens": 5 + i}
                                                    for i, p in enumerate(prompts)])
    for src, out in ((openai, "openai_out.jsonl"), (native, "native_out.jsonl")):
        code, _, err = cli("--input", src, "--output", tmp_path / out, *FAST)
        assert code == 0, err
    answers = [json.loads(line) for line in (tmp_path / "openai_out.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "native_out.jsonl").read_text().splitlines()]
    assert [a["custom_id"] for a in answers] == ["req-0", "req-1", "req-2"]
    for answer, row in zip(answers, rows):
        body = answer["response"]["body"]
        assert answer["response"]["status_code"] == 200 and answer["error"] is None
        assert body["model"] == "mine" and body["object"] == "text_completion"
        assert body["choices"][0]["text"] == row["text"]
        assert body["choices"][0]["finish_reason"] == row["finish_reason"]
        assert body["usage"] == row["usage"]


def test_shards_merge_into_the_whole_run(cli, llama_dir, tmp_path):
    from flexgen_dist.merge import main as merge_main
    from tiny_models import random_prompts

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"p{i}", "input_ids": p}
                                               for i, p in enumerate(random_prompts([4, 8, 3, 6, 9, 5, 7], seed=2))])
    run_ids_job(cli, llama_dir, src, tmp_path / "whole.jsonl", "--do-sample")
    for index in range(3):
        run_ids_job(cli, llama_dir, src, tmp_path / "out.jsonl", "--do-sample", "--shard", f"{index}/3")
    assert merge_main(["--input", str(src), str(tmp_path / "out.jsonl")]) == 0
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_one_off_prompts_stop_strings_and_the_gen_len_alias(cli):
    prompts = ["Return the number of", "This module provides"]
    code, out, err = cli(*[a for p in prompts for a in ("--prompt", p)], "--max-new-tokens", 12, *FAST)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("policy: blocks of 2 prompts (2 x 1 gpu batches)") and "weights: gpu" in lines[0]
    assert [line.split(" -> ")[0] for line in lines[1:3]] == [repr(p) for p in prompts]
    assert lines[-1].startswith("throughput:")
    texts = [eval(line.split(" -> ", 1)[1]) for line in lines[1:3]]
    code, alias_out, _ = cli(*[a for p in prompts for a in ("--prompt", p)], "--gen-len", 12, *FAST)
    assert alias_out.splitlines()[1:3] == lines[1:3]
    stop = texts[0][4:7]
    code, out, _ = cli("--prompt", prompts[0], "--max-new-tokens", 12, "--stop", stop, *FAST)
    assert out.splitlines()[1] == f"{prompts[0]!r} -> {texts[0][:texts[0].find(stop)]!r}"


def test_help_is_grouped_and_every_flag_says_its_default():
    parser = build_parser()
    text = parser.format_help()
    titles = ["model:", "prompts and output:", "generation:", "policy and placement:", "offloading I/O:",
              "distributed:", "diagnostics:"]
    assert [text.index(t) for t in titles] == sorted(text.index(t) for t in titles)
    for action in parser._actions:
        if action.dest in ("help", "version"):
            continue
        shown = parser.formatter_class("x")._get_help_string(action)
        assert action.help and len(action.help) > 15, action.dest
        assert "default" in shown, (action.dest, shown)
    assert "--max-new-tokens N, --gen-len N" in text


def test_version_and_the_package_alias(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"flexgen_dist {__version__}"
    proc = subprocess.run([sys.executable, "-m", "flexgen_dist", "--version"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"flexgen_dist {__version__}"


def test_the_console_script_is_the_run_command(monkeypatch, capsys):
    """flexgen-dist is run's main, its exit code ending the process (cli: exit_process)."""
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, name = scripts["flexgen-dist"].split(":")
    script = getattr(__import__(module, fromlist=[name]), name)
    monkeypatch.setattr(sys, "argv", ["flexgen-dist", "--version"])
    with pytest.raises(SystemExit) as ended:
        script()
    assert ended.value.code == 0 and capsys.readouterr().out.strip() == f"flexgen_dist {__version__}"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_lines_without_a_terminal_and_a_bar_on_one():
    clock, stream = Clock(), io.StringIO()
    progress = Progress(total=200, initial=40, stream=stream, interval_s=0, clock=clock)
    clock.now += 10
    progress.update(prompts=20, tokens=1280)
    progress.tick()
    progress.close()
    assert stream.getvalue() == "progress: 60/200 prompts (30%), 128.0 tok/s, ETA 1m10s\n"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    with Progress(total=10, stream=terminal) as bar:
        bar.update(prompts=4, tokens=64)
    assert "4/10" in terminal.getvalue() and "prompt" in terminal.getvalue()
    quiet = io.StringIO()
    with Progress(total=10, stream=quiet, enabled=False) as off:
        off.update(prompts=4, tokens=64)
        off.close()
    assert quiet.getvalue() == ""


@pytest.mark.dist
def test_a_pipeline_applies_each_requests_rules_as_one_process(cli, tmp_path):
    """Stop strings, stop ids, per-line limits and sampling give the same results on two ranks
    (the last samples, the first records what it receives) as in one process."""
    prompts = ["Return the number of", "This module provides", "If the optional argument", "A class definition is",
               "The list data type has some more methods.", "Compound statements contain"]
    rows = [{"id": i, "prompt": p} for i, p in enumerate(prompts)]
    rows[0]["max_new_tokens"], rows[1]["stop"], rows[2]["temperature"], rows[3]["stop_token_ids"] = 3, ["\n"], 0.9, [14]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--input", src, "--max-new-tokens", 12, "--stop", ".", "--do-sample", "--temperature", 0.7, *FAST]
    code, _, err = cli(*args, "--output", tmp_path / "one.jsonl")
    assert code == 0, err
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "flexgen_dist", *map(str, args), "--output", str(tmp_path / "two.jsonl")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = (tmp_path / "one.jsonl").read_text()
    assert (tmp_path / "two.jsonl").read_text() == one
    assert {json.loads(line)["finish_reason"] for line in one.splitlines()} == {"stop", "length"}


def test_row_utilization_counts_the_steps_rows_sit_idle(cli, llama_dir, tmp_path):
    """A block runs until its longest row ends: rows whose own limit is shorter sit idle. Limits
    6, 6, 2, 1 on prompts of one length make blocks {6, 6} and {2, 1} (2 rows, 1 batch): 15
    tokens in 2 x 6 + 2 x 2 = 16 row-steps."""
    rows = [{"id": f"r{i}", "input_ids": [5, 6, 7], "max_new_tokens": limit} for i, limit in enumerate((6, 1, 6, 2))]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    stats = tmp_path / "stats.json"
    code, stdout, err = cli("--model", llama_dir, "--input", src, "--output", tmp_path / "out.jsonl", "--ignore-eos",
                            "--num-gpu-batches", 1, "--stats-json", stats, *FAST)
    assert code == 0, err
    record = json.loads(stats.read_text())
    assert (record["generated_tokens"], record["row_steps"]) == (15, 16)
    assert record["row_utilization"] == pytest.approx(15 / 16)
    assert "rows busy 94% of their steps" in stdout


def test_offload_folders_of_a_deleted_checkpoint_are_listed_then_pruned_on_request(cli, tmp_path):
    from tiny_models import make_tiny_model

    a, b = (make_tiny_model("llama", tmp_path / name, seed=seed) for seed, name in enumerate(("a", "b")))
    off = tmp_path / "off"
    on_disk = ("--percent", 0, 0, 100, 0, 100, 0, "--offload-dir", off, "--num-prompts", 2, "--prompt-len", 3,
               "--max-new-tokens", 2, *FAST)
    assert cli("--model", a, *on_disk)[0] == 0
    (folder_a,) = list(off.glob("weights-*"))
    shutil.rmtree(a)
    code, _, err = cli("--model", b, *on_disk)
    assert code == 0, err
    warned = [line for line in err.splitlines() if str(folder_a) in line]
    assert len(warned) == 1 and "no longer exists" in warned[0] and "--prune-offload" in warned[0], err
    assert folder_a.is_dir()  # listed, not deleted
    code, _, err = cli("--model", b, *on_disk, "--prune-offload")
    assert code == 0, err
    assert not folder_a.exists() and len(list(off.glob("weights-*"))) == 1
