"""Jobs that used to fail late or lose work: text that is not Unicode (a lone surrogate in a JSON
line, bytes that are not UTF-8 in --prompt), a native line with a key named like an OpenAI one,
an output that cannot be replaced, resume advice that would discard results, and a job whose
output sits in the model folder (its own progress files changed the model's fingerprint)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flexgen_dist.jobs import run as job_module
from flexgen_dist.jobs.inputs import read_job_file
from flexgen_dist.jobs.outputs import progress_paths
from flexgen_dist.cli.shell import Interrupted

FAST = ["--no-warmup", "--quiet", "--gpu-batch-size", "2", "--device", "cpu"]
PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16], [17, 18, 19, 20], [21, 22]]



def one_error_line(code, err, fragment):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert "Traceback" not in err


def ids_file(path, prompts=PROMPTS):
    path.write_text("".join(json.dumps({"id": i, "input_ids": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def stop_after_first_block(monkeypatch):
    real_add = job_module.LogSink.add

    def add_then_stop(self, items):
        real_add(self, items)
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(job_module.LogSink, "add", add_then_stop)


# ---- text that is not Unicode -------------------------------------------------------------------


@pytest.mark.parametrize("line, fragment", [
    ('{"id": "a\\ud800", "input_ids": [5, 6]}', "in.jsonl:2: 'id': character 2 is \\ud800"),
    ('{"id": 2, "input_ids": [5], "stop_token_ids": [7], "note": {"k": ["\\udfff"]}}', "in.jsonl:2: 'k': character 1"),
    ('{"custom_id": "x\\udc00", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}',
     "in.jsonl:2: 'custom_id'"),
])
def test_a_lone_surrogate_is_refused_at_validation_with_file_and_line(cli, llama_dir, tmp_path, line, fragment):
    first = ('{"custom_id": "ok", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}'
             if "custom_id" in line else '{"id": 1, "input_ids": [5, 6]}')
    src = tmp_path / "in.jsonl"
    src.write_text(first + "\n" + line + "\n")
    code, _, err = cli("--model", llama_dir, "--input", src, "--output", tmp_path / "out.jsonl", *FAST)
    one_error_line(code, err, fragment)
    assert "surrogate" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing ran, nothing written


def test_a_surrogate_pair_is_one_character_and_runs(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "smile \\ud83d\\ude00", "input_ids": [5, 6]}\n')
    assert read_job_file(src).requests[0].id == "smile \U0001f600"


def test_a_prompt_argument_that_is_not_utf8_is_one_line_naming_the_flag(tmp_path):
    """Bytes from the shell reach Python as surrogateescape characters; the tokenizer used to
    raise a traceback on them."""
    argv = [sys.executable, "-m", "flexgen_dist.run", "--prompt", b"ok", "--prompt", b"caf\xe9", "--max-new-tokens", "2",
            *FAST]  # the bundled model, which has a tokenizer
    result = subprocess.run(argv, capture_output=True, cwd=Path(__file__).resolve().parents[1], timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: --prompt (the 2nd): byte 0xe9 at character 4 is not UTF-8; pass UTF-8 text"


def test_a_stop_string_that_is_not_utf8_is_refused(cli, llama_dir):
    one_error_line(*cli("--model", llama_dir, "--prompt-len", 4, "--stop", os.fsdecode(b"\xff"), *FAST)[::2],
                   "--stop: byte 0xff at character 1 is not UTF-8")


# ---- which format a line is ---------------------------------------------------------------------


def test_a_native_line_with_a_url_key_is_native(cli, llama_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "page", "input_ids": [5, 6, 7], "url": "https://example.com/a", "method": "GET"})
                   + "\n")
    code, _, err = cli("--model", llama_dir, "--input", src, "--output", tmp_path / "out.jsonl", "--max-new-tokens", 3,
                       *FAST)
    assert code == 0, err
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["id"] == "page" and len(row["output_ids"]) == 3


@pytest.mark.parametrize("row, fragment", [
    ({"custom_id": "a", "method": "POST", "url": "/v1/completions", "prompt": "hi"}, "unknown key 'prompt'"),
    ({"custom_id": "a", "prompt": "hi"}, "unknown key 'prompt'"),
    ({"method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}, "needs a 'custom_id'"),
])
def test_an_openai_line_with_a_part_missing_or_misplaced_is_still_read_as_one(tmp_path, row, fragment):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(row) + "\n")
    with pytest.raises(Exception, match=fragment):
        read_job_file(src)


# ---- outputs that cannot be replaced, and resume advice ------------------------------------------


def _chattr(flag, path):
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    result = subprocess.run(["chattr", flag, str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"chattr {flag} not possible here: {result.stderr.decode().strip()}")


def test_an_immutable_output_is_refused_before_the_run(cli, llama_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("the user's file\n")
    _chattr("+i", out)
    try:
        code, _, err = cli("--model", llama_dir, "--input", ids_file(tmp_path / "in.jsonl"), "--output", out,
                           "--overwrite", *FAST)
    finally:
        subprocess.run(["chattr", "-i", str(out)])
    one_error_line(code, err, "is immutable (chattr +i), so it cannot be replaced")
    assert not progress_paths(out)[0].exists() and out.read_text() == "the user's file\n"


def test_advice_after_an_overwrite_run_never_says_to_overwrite_again(cli, llama_dir, tmp_path, monkeypatch):
    src, out = ids_file(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    out.write_text("the user's old results\n")
    stop_after_first_block(monkeypatch)
    code, _, err = cli("--model", llama_dir, "--input", src, "--output", out, "--max-new-tokens", 4, "--overwrite", *FAST)
    monkeypatch.undo()
    assert code == 143 and "2 of 6 results are saved" in err
    assert "run the command again without --overwrite to resume" in err
    code, out_text, err = cli("--model", llama_dir, "--input", src, "--output", out, "--max-new-tokens", 4, *FAST)
    assert code == 0, err
    assert "resumed: 2 of 6 results came from an earlier run" in out_text
    assert len(out.read_text().splitlines()) == 6


# ---- a job inside the model folder ----------------------------------------------------------------


def test_a_job_whose_files_sit_in_the_model_folder_resumes(cli, llama_dir, tmp_path, monkeypatch):
    model = shutil.copytree(llama_dir, tmp_path / "model")
    src, out = ids_file(model / "in.jsonl"), model / "out.jsonl"
    stop_after_first_block(monkeypatch)
    code, _, err = cli("--model", model, "--input", src, "--output", out, "--max-new-tokens", 4, *FAST)
    monkeypatch.undo()
    assert code == 143 and progress_paths(out)[0].exists()
    (model / "notes.txt").write_text("the user's notes beside the model\n")  # not part of the model either
    code, out_text, err = cli("--model", model, "--input", src, "--output", out, "--max-new-tokens", 4, *FAST)
    assert code == 0, err
    assert "resumed: 2 of 6 results came from an earlier run" in out_text
    reference = tmp_path / "reference.jsonl"
    code, _, err = cli("--model", llama_dir, "--input", ids_file(tmp_path / "in.jsonl"), "--output", reference,
                       "--max-new-tokens", 4, *FAST)
    assert code == 0, err
    assert out.read_bytes() == reference.read_bytes()


def test_a_changed_generation_config_is_another_model(cli, llama_dir, tmp_path, monkeypatch):
    model = shutil.copytree(llama_dir, tmp_path / "model")
    src, out = ids_file(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    stop_after_first_block(monkeypatch)
    cli("--model", model, "--input", src, "--output", out, "--max-new-tokens", 4, *FAST)
    monkeypatch.undo()
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    one_error_line(*cli("--model", model, "--input", src, "--output", out, "--max-new-tokens", 4, *FAST)[::2],
                   "the model differs")


def test_another_users_output_in_a_sticky_folder_is_refused_before_the_run(tmp_path, monkeypatch):
    """Like /tmp: the final rename over another user's file fails (EPERM) after all the work."""
    from flexgen_dist.errors import UserError
    from flexgen_dist.jobs import outputs

    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o1777)
    (folder / "out.jsonl").write_text("someone else's results\n")
    outputs.check_output_path(folder / "out.jsonl")  # our own file: replaceable
    monkeypatch.setattr(outputs.os, "geteuid", lambda: 4242)  # a user who owns neither the file nor the folder
    with pytest.raises(UserError, match="belongs to another user in a sticky folder"):
        outputs.check_output_path(folder / "out.jsonl")
    outputs.check_output_path(folder / "new.jsonl")  # a new file there is fine
