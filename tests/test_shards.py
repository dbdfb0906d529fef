"""Shards: `--shard I/N` and SLURM array environments parsed, a deterministic partition of the
input, and `python -m flexgen_dist.merge` joining shard outputs into the unsharded order, with a
missing, repeated or foreign id refused (file and line named)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexgen_dist.errors import UserError
from flexgen_dist.jobs.inputs import read_job_file
from flexgen_dist.jobs.outputs import RunIdentity, output_row
from flexgen_dist.jobs.resume import open_for_resume
from flexgen_dist.api.results import Output
from flexgen_dist.jobs.requests import Shard, shard_output_path
from flexgen_dist.merge import find_shard_outputs, main as merge_main, merge_shards
from flexgen_dist.jobs.config import parse_shard

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, expected", [("0/4", Shard(index=0, count=4)), ("3/4", Shard(index=3, count=4)),
                                            (" 1 / 2 ", Shard(index=1, count=2)), ("0/1", Shard(index=0, count=1))])
def test_parse_shard_flag(text, expected):
    assert parse_shard(text, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}) == expected


@pytest.mark.parametrize("text, fragment", [("4/4", "must be below N"), ("1/0", "must be below N"),
                                            ("a/4", "expected I/N"), ("-1/4", "expected I/N"), ("2", "expected I/N")])
def test_bad_shard_flags(text, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_shard(text, {})


@pytest.mark.parametrize("env, expected", [
    ({}, Shard(index=0, count=1)),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "3"},
     Shard(index=2, count=4)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_MAX": "6"},
     Shard(index=2, count=4)),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}, Shard(index=1, count=2)),
])
def test_slurm_array_environment(env, expected):
    assert parse_shard(None, env) == expected


@pytest.mark.parametrize("env, fragment", [
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "4",
      "SLURM_ARRAY_TASK_STEP": "4"}, "not 2 consecutive numbers"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "5"},
     "not 3 consecutive numbers"),
    ({"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT is not"),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "not a whole number"),
])
def test_unusable_slurm_arrays_are_refused(env, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_shard(None, env)


def test_shards_partition_the_input_round_robin(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"x{i}", "input_ids": [i + 1]}) + "\n" for i in range(10)))
    shards = [read_job_file(path, Shard(index=i, count=3)) for i in range(3)]
    assert [r.id for r in shards[1].requests] == ["x1", "x4", "x7"]
    assert sorted(r.index for job in shards for r in job.requests) == list(range(10))
    assert {job.sha256 for job in shards} == {read_job_file(path).sha256} and shards[2].num_requests == 10
    assert [r.id for r in read_job_file(path, Shard(index=1, count=3)).requests] == ["x1", "x4", "x7"]


def test_shard_output_names():
    assert shard_output_path("out/results.jsonl", Shard(index=2, count=4)) == "out/results.shard-2-of-4.jsonl"
    assert shard_output_path("results", Shard(index=0, count=2)) == "results.shard-0-of-2"
    assert shard_output_path("results.jsonl", Shard(index=0, count=1)) == "results.jsonl"
    assert shard_output_path("-", Shard(index=1, count=2)) == "-"


def make_input(tmp_path, count=10):
    path = tmp_path / "in.jsonl"
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": {"prompt": f"p{i}"}}
             for i in range(count)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run_shard(input_path, output, shard):
    """What run.py does for one shard, with fake results: validate, resume, append, finish."""
    job = read_job_file(input_path, shard)
    out = shard_output_path(str(output), shard)
    log = open_for_resume(out, RunIdentity(model="m", input_sha256=job.sha256, settings={}, shard=str(shard),
                                           output_format=job.format))
    for request in reversed(job.requests):  # finishing order differs from input order
        completion = Output(prompt_ids=[0] * 2, output_ids=[1, 2], text=f"answer {request.id}", finish_reason="stop")
        log.append([output_row(request, completion, model_name="m", created=0)])
    log.finish(job.keys)
    return Path(out)


def test_merge_of_three_shards_equals_the_unsharded_output(tmp_path):
    src = make_input(tmp_path)
    whole = run_shard(src, tmp_path / "whole.jsonl", Shard(index=0, count=1))
    shards = [run_shard(src, tmp_path / "results.jsonl", Shard(index=i, count=3)) for i in range(3)]
    assert [p.name for p in find_shard_outputs(str(tmp_path / "results.jsonl"))] == [p.name for p in shards]
    assert merge_shards(src, tmp_path / "results.jsonl", list(reversed(shards))) == 10
    assert (tmp_path / "results.jsonl").read_bytes() == whole.read_bytes()
    assert merge_main(["--input", str(src), "--overwrite", str(tmp_path / "results.jsonl")]) == 0  # found by name
    assert (tmp_path / "results.jsonl").read_bytes() == whole.read_bytes()


def test_merge_run_again_is_a_no_op_and_another_file_is_refused(tmp_path, capsys):
    src = make_input(tmp_path)
    out = tmp_path / "results.jsonl"
    [run_shard(src, out, Shard(index=i, count=3)) for i in range(3)]
    assert merge_main(["--input", str(src), str(out)]) == 0
    before, mtime = out.read_bytes(), out.stat().st_mtime_ns
    capsys.readouterr()
    assert merge_main(["--input", str(src), str(out)]) == 0  # a requeued job merges again
    assert capsys.readouterr().out.strip() == f"already complete: 10 results in {out}"
    assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime
    out.write_bytes(before[:-1] + b" \n")  # someone else's file now
    assert merge_main(["--input", str(src), str(out)]) == 2
    assert "already exists and is not the merge of these shards; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before[:-1] + b" \n"


def merged_error(src, out, shards):
    with pytest.raises(UserError) as info:
        merge_shards(src, out, shards)
    assert not Path(out).exists()
    return str(info.value)


def test_merge_refuses_missing_repeated_and_foreign_ids(tmp_path):
    src = make_input(tmp_path)
    out = tmp_path / "results.jsonl"
    shards = [run_shard(src, out, Shard(index=i, count=3)) for i in range(3)]
    lines = [p.read_text().splitlines(keepends=True) for p in shards]

    shards[1].write_text("".join(lines[1][:1] + lines[1][2:]))  # req-4 (input line 5) lost
    assert merged_error(src, out, shards).startswith(f'{src}:5: id "req-4" has no result in the shard outputs')

    shards[1].write_text("".join(lines[1] + lines[0][:1]))  # req-0 in shards 0 and 1
    message = merged_error(src, out, shards)
    assert message.startswith(f'{shards[1]}:4: id "req-0" is also in {shards[0]}:1'), message

    foreign = json.loads(lines[0][0])
    foreign["custom_id"] = "elsewhere"
    shards[1].write_text("".join(lines[1]) + json.dumps(foreign) + "\n")
    assert merged_error(src, out, shards).startswith(f'{shards[1]}:4: id "elsewhere" is not in')

    shards[1].write_text("".join(lines[1])[:-3])
    assert "cut short" in merged_error(src, out, shards)


def test_merge_finds_a_missing_or_unfinished_shard(tmp_path):
    src = make_input(tmp_path)
    out = tmp_path / "results.jsonl"
    shards = [run_shard(src, out, Shard(index=i, count=3)) for i in range(3)]
    shards[2].unlink()
    with pytest.raises(UserError, match="shard 2/3 output .* is missing$"):
        find_shard_outputs(str(out))
    Path(str(shards[2]) + ".partial").write_text("")
    with pytest.raises(UserError, match="still unfinished"):
        find_shard_outputs(str(out))


def test_merge_command_line_error_is_one_line_exit_2(tmp_path):
    src = make_input(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "flexgen_dist.merge", "--input", str(src), str(tmp_path / "r.jsonl")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: no shard outputs")
