"""Standard output that fails, with the run command as a subprocess on the bundled model: closed
(`>&-`), a reader that goes away (`| head -1`), a full disk behind `>` (/dev/full), an
ASCII-only encoding. Never a traceback; a job's results in a file are kept."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from flexgen_dist.jobs.outputs import StdoutLog

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
RUN = [sys.executable, "-m", "flexgen_dist.run"]
FAST = ["--max-new-tokens", "3", "--no-warmup", "--quiet", "--device", "cpu"]
PROMPTS = ["--prompt", "héllo wörld", "--prompt", "naïve café"]

# The run waits, after its first line (the policy) is out, until the test has closed its end of
# the pipe: the next write then meets a reader that is gone, every time.
HELD = r"""
import json, sys
from flexgen_dist import run
from flexgen_dist.jobs import run as job
generate = job._generate
def held(*args, **kwargs):
    sys.stdin.readline()
    return generate(*args, **kwargs)
job._generate = held
sys.exit(run.main(json.loads(sys.argv[1])))
"""


def job_file(tmp_path) -> Path:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(["héllo", "wörld", "x"])))
    return src


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_reader_that_goes_away_ends_the_run_quietly_and_keeps_the_results(tmp_path):
    src, out = job_file(tmp_path), tmp_path / "out.jsonl"
    args = ["--input", str(src), "--output", str(out), *FAST]
    proc = subprocess.Popen([sys.executable, "-c", HELD, json.dumps(args)], env=ENV, cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"policy:")
    proc.stdout.close()  # `| head -1`
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141, err
    assert err == ""  # quiet, as a Unix tool ended by SIGPIPE
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, 1, 2]


def test_a_full_disk_behind_stdout_is_one_line_exit_1(tmp_path):
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(RUN + PROMPTS + FAST, env=ENV, cwd=tmp_path, stdout=full, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines(proc.stderr)) == 1 and "cannot write to standard output: No space left on device" in proc.stderr


def test_a_full_disk_behind_stdout_with_dash_output_is_one_line_too(tmp_path):
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(RUN + ["--input", str(job_file(tmp_path)), "--output", "-", *FAST], env=ENV,
                              cwd=tmp_path, stdout=full, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and lines(proc.stderr)[-1].endswith(
        "cannot write to standard output: No space left on device")


def test_a_closed_stdout_refuses_a_run_that_prints_its_results_and_runs_one_that_saves_them(tmp_path):
    def closed(*args):
        return subprocess.run(RUN + list(args), env=ENV, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: os.close(1))

    for args in (PROMPTS + FAST, ["--input", str(job_file(tmp_path)), "--output", "-", *FAST]):
        proc = closed(*args)
        assert proc.returncode == 2, proc.stderr
        assert len(lines(proc.stderr)) == 1 and "standard output is closed" in proc.stderr
    out = tmp_path / "out.jsonl"
    proc = closed("--input", str(job_file(tmp_path)), "--output", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(out.read_text().splitlines()) == 3


def test_an_ascii_only_stdout_escapes_what_it_cannot_show(tmp_path):
    proc = subprocess.run(RUN + PROMPTS + FAST, env={**ENV, "PYTHONIOENCODING": "ascii"}, cwd=tmp_path,
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr
    assert b"'h\\xe9llo w\\xf6rld' -> " in proc.stdout


def test_json_lines_on_an_ascii_only_stream_are_escaped_json():
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    log = StdoutLog(stream)
    log.append([{"id": "é", "output_ids": [1], "text": "naïve"}])
    log.finish(['"é"'])
    stream.seek(0)
    (line,) = stream.read().splitlines()
    assert line.isascii() and json.loads(line) == {"id": "é", "output_ids": [1], "text": "naïve"}


def test_merge_with_a_full_or_closed_stdout_keeps_the_merged_file(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "input_ids": [5]}) + "\n" for i in range(4)))
    for index in range(2):
        rows = [{"id": i, "output_ids": [7]} for i in range(4) if i % 2 == index]
        (tmp_path / f"out.shard-{index}-of-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    merge = [sys.executable, "-m", "flexgen_dist.merge", "--input", str(src), "--overwrite", str(tmp_path / "out.jsonl")]
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(merge, env=ENV, stdout=full, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 1 and lines(proc.stderr) == ["cannot write to standard output: No space left on device"]
    assert [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    proc = subprocess.run(merge, env=ENV, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert proc.returncode == 0 and proc.stderr == ""
