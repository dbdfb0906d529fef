"""Merge checks provenance: a finished shard records the run that made it (OUT.made-by.json), and
`merge` refuses shards of different runs (another model, other settings, another version of the
input) in one line naming the two shards and the first field that differs."""

import json
import logging
from pathlib import Path

import pytest

from flexgen_dist.errors import UserError
from flexgen_dist.jobs.inputs import read_job_file
from flexgen_dist.api.results import Output
from flexgen_dist.jobs.outputs import output_row, RunIdentity, provenance_path
from flexgen_dist.jobs.resume import open_for_resume
from flexgen_dist.jobs.requests import Shard, shard_output_path
from flexgen_dist.merge import main as merge_main, merge_shards


def make_input(tmp_path, count=6, name="in.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"id": i, "input_ids": [5, 6 + i]}) + "\n" for i in range(count)))
    return path


def run_shard(input_path, output, shard, *, model="m", settings=None):
    job = read_job_file(input_path, shard)
    out = shard_output_path(str(output), shard)
    identity = RunIdentity(model=model, input_sha256=job.sha256, settings=settings or {"max_new_tokens": 4},
                           shard=str(shard), output_format=job.format)
    log = open_for_resume(out, identity)
    if shard.count > 1:  # as the run command does
        log.keep_provenance(identity)
    for request in job.requests:
        log.append([output_row(request, Output(prompt_ids=[0] * 2, output_ids=[1], text=None, finish_reason="length"),
                               model_name="m", created=0)])
    log.finish(job.keys)
    return Path(out)


def refused(src, out, shards):
    with pytest.raises(UserError) as info:
        merge_shards(src, out, shards)
    assert not Path(out).exists()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_finished_shard_records_its_run_and_a_whole_run_writes_nothing_beside_its_output(tmp_path):
    src = make_input(tmp_path)
    shard = run_shard(src, tmp_path / "out.jsonl", Shard(index=1, count=2))
    record = json.loads(provenance_path(shard).read_text())
    assert record["shard"] == "1/2" and record["model"] == "m" and record["settings"] == {"max_new_tokens": 4}
    whole = run_shard(src, tmp_path / "whole.jsonl", Shard(index=0, count=1))
    assert not provenance_path(whole).exists()


@pytest.mark.parametrize("change, fragment", [
    ({"model": "other"}, "the model differs"),
    ({"settings": {"max_new_tokens": 8}}, "the generation setting max_new_tokens differs (8 against 4)"),
    ({"settings": {"max_new_tokens": 4, "seed": 1}}, "the generation setting seed differs (1 against null)"),
])
def test_shards_of_another_model_or_other_settings_are_refused(tmp_path, change, fragment):
    src = make_input(tmp_path)
    out = tmp_path / "out.jsonl"
    shards = [run_shard(src, out, Shard(index=0, count=2)), run_shard(src, out, Shard(index=1, count=2), **change)]
    message = refused(src, out, shards)
    assert message.startswith(f"{shards[1]} and {shards[0]} were made by different runs: {fragment}"), message


def test_shards_of_another_version_of_the_input_are_refused(tmp_path):
    old = make_input(tmp_path, name="old.jsonl")
    out = tmp_path / "out.jsonl"
    src = tmp_path / "in.jsonl"
    src.write_text(old.read_text().replace("[5, 6]", "[5, 9]"))  # same ids, another prompt
    shards = [run_shard(old, out, Shard(index=0, count=2)), run_shard(src, out, Shard(index=1, count=2))]
    assert "the input file's content differs" in refused(src, out, shards)
    shards[1] = run_shard(old, tmp_path / "again.jsonl", Shard(index=1, count=2))  # both from the old version
    message = refused(src, out, shards)
    assert message.startswith(f"the shards were made from another version of '{src}'"), message
    assert merge_shards(old, out, shards) == 6  # with the file they ran on, they merge


def test_a_shard_without_a_record_among_recorded_ones_and_a_damaged_record_are_refused(tmp_path):
    src = make_input(tmp_path)
    out = tmp_path / "out.jsonl"
    shards = [run_shard(src, out, Shard(index=i, count=2)) for i in range(2)]
    record = provenance_path(shards[1])
    saved = record.read_text()
    record.unlink()
    assert refused(src, out, shards).startswith(f"{shards[1]} has no record of the run that made it")
    damaged = json.loads(saved)
    damaged["settings"] = ["max_new_tokens"]
    record.write_text(json.dumps(damaged, indent=1))
    assert refused(src, out, shards).startswith(f"{record}:")
    provenance_path(shards[0]).unlink()
    record.unlink()
    assert merge_shards(src, out, shards) == 6  # no record at all (by hand, an older version): ids alone


def test_the_merge_command_refuses_shards_run_with_other_flags(llama_dir, tmp_path, capsys):
    from flexgen_dist.run import main as run_main

    src = make_input(tmp_path)
    out = tmp_path / "out.jsonl"
    common = ["--model", str(llama_dir), "--input", str(src), "--output", str(out), "--no-warmup", "--quiet",
              "--device", "cpu"]
    assert run_main(common + ["--shard", "0/2", "--max-new-tokens", "3"]) == 0
    assert run_main(common + ["--shard", "1/2", "--max-new-tokens", "4"]) == 0
    for handler in list(logging.getLogger().handlers):
        if getattr(handler, "_flexgen_dist", False):
            logging.getLogger().removeHandler(handler)
    capsys.readouterr()
    assert merge_main(["--input", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_new_tokens differs (4 against 3)" in err and "out.shard-1-of-2.jsonl" in err
    assert not out.exists()
