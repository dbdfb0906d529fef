"""Resumable output: whole lines appended per block, a torn tail repaired, another run's identity
refused, the final file in input order with each id once, and a child killed with SIGKILL at
several points (mid-write, between write and fsync, inside finish) resumed to the same bytes as
an uninterrupted run. Pure Python; children are waited for, never timed."""

import io
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from flexgen_dist.errors import UserError
from flexgen_dist.temp_names import TEMP_TAG
from flexgen_dist.jobs.outputs import check_output_path, RunIdentity, StdoutLog, progress_paths
from flexgen_dist.jobs.resume import open_for_resume

REPO = Path(__file__).resolve().parents[1]
IDENTITY = RunIdentity(model="model-a", input_sha256="0" * 64, settings={"max_new_tokens": 4, "temperature": 0.0})


def row(request_id):
    return {"id": request_id, "output_ids": [len(str(request_id)), 7], "text": f"out {request_id}"}


def key(request_id):
    return json.dumps(request_id)


def ids_in(path):
    return [json.loads(line)["id"] for line in Path(path).read_text().splitlines()]


def test_append_reopen_finish_in_input_order(tmp_path):
    out = tmp_path / "out.jsonl"
    order = ["a", "b", 3, "d"]
    log = open_for_resume(out, IDENTITY)
    log.append([row("d"), row("b")])
    log.close()
    log = open_for_resume(out, IDENTITY)
    assert set(log.finished) == {key("d"), key("b")} and not out.exists()
    log.append([row(3)])
    log.append([row("a")])
    log.finish([key(i) for i in order])
    assert ids_in(out) == order
    assert [json.loads(line) for line in out.read_text().splitlines()] == [row(i) for i in order]
    assert not any(p.exists() for p in progress_paths(out))


def test_a_torn_last_line_is_dropped_and_the_file_repaired(tmp_path):
    out = tmp_path / "out.jsonl"
    partial, _ = progress_paths(out)
    with open_for_resume(out, IDENTITY) as log:
        log.append([row("a"), row("b")])
    whole = partial.read_bytes()
    with open(partial, "ab") as f:
        f.write(json.dumps(row("c")).encode()[:15])  # killed in the middle of a line
    log = open_for_resume(out, IDENTITY)
    assert set(log.finished) == {key("a"), key("b")}
    assert partial.read_bytes() == whole
    log.append([row("c")])
    log.finish([key("a"), key("b"), key("c")])
    assert ids_in(out) == ["a", "b", "c"]


def test_a_damaged_line_and_what_follows_are_computed_again(tmp_path):
    out = tmp_path / "out.jsonl"
    partial, _ = progress_paths(out)
    with open_for_resume(out, IDENTITY) as log:
        log.append([row("a")])
    with open(partial, "ab") as f:
        f.write(b"\0\0\0\0\n" + json.dumps(row("c")).encode() + b"\n")  # zeros a power loss can leave
    with open_for_resume(out, IDENTITY) as log:
        assert set(log.finished) == {key("a")}
    assert partial.read_bytes() == (json.dumps(row("a")) + "\n").encode()


@pytest.mark.parametrize("changed, fragment", [
    ({"model": "model-b"}, "the model differs"),
    ({"input_sha256": "1" * 64}, "the input file's content differs"),
    ({"settings": {"max_new_tokens": 8, "temperature": 0.0}}, "generation settings differ (max_new_tokens: 4 -> 8)"),
    ({"shard": "1/4"}, "the shard differs (0/1 -> 1/4)"),
    ({"output_format": "openai"}, "the output format differs"),
])
def test_another_run_is_refused_and_overwrite_starts_over(tmp_path, changed, fragment):
    out = tmp_path / "out.jsonl"
    with open_for_resume(out, IDENTITY) as log:
        log.append([row("a")])
    other = RunIdentity(**{**IDENTITY.__dict__, **changed})
    with pytest.raises(UserError) as info:
        open_for_resume(out, other)
    message = str(info.value)
    assert fragment in message and "--overwrite" in message and "\n" not in message, message
    with open_for_resume(out, other, overwrite=True) as log:
        assert len(log.finished) == 0
    with open_for_resume(out, other) as log:  # the new identity is the recorded one now
        assert len(log.finished) == 0


def test_an_existing_output_is_never_replaced_without_overwrite(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("the user's own file\n")
    with pytest.raises(UserError, match="already exists .* pass --overwrite"):
        open_for_resume(out, IDENTITY)
    assert out.read_text() == "the user's own file\n"
    assert not any(p.exists() for p in progress_paths(out))  # no litter from the refusal
    log = open_for_resume(out, IDENTITY, overwrite=True)
    log.append([row("a")])
    log.close()
    assert out.read_text() == "the user's own file\n"  # replaced only when the new one is whole
    log = open_for_resume(out, IDENTITY)  # resuming the consented overwrite needs no flag again
    log.finish([key("a")])
    assert ids_in(out) == ["a"]


def test_results_without_a_record_are_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    with open_for_resume(out, IDENTITY) as log:
        log.append([row("a")])
    progress_paths(out)[1].unlink()
    with pytest.raises(UserError, match="which run made them"):
        open_for_resume(out, IDENTITY)


def test_finish_refuses_a_missing_or_unknown_id_and_keeps_the_progress(tmp_path):
    out = tmp_path / "out.jsonl"
    log = open_for_resume(out, IDENTITY)
    log.append([row("a"), row("b")])
    with pytest.raises(ValueError, match="already has a result"):
        log.append([row("c"), row("a")])
    with pytest.raises(ValueError, match='id "z" has no result'):
        log.finish([key("a"), key("b"), key("z")])
    with pytest.raises(ValueError, match="not in the order"):
        log.finish([key("a")])
    with pytest.raises(ValueError, match="appears twice"):
        log.finish([key("a"), key("a"), key("b")])
    assert not out.exists() and progress_paths(out)[0].exists()
    assert not list(tmp_path.glob(f"*.{TEMP_TAG}.*"))
    log.finish([key("b"), key("a")])
    assert ids_in(out) == ["b", "a"]


def test_a_second_writer_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    with open_for_resume(out, IDENTITY):
        with pytest.raises(UserError, match="another process is writing"):
            open_for_resume(out, IDENTITY)


def test_created_files_respect_the_umask(tmp_path):
    out = tmp_path / "out.jsonl"
    previous = os.umask(0o027)
    try:
        log = open_for_resume(out, IDENTITY)
        log.append([row("a")])
        modes = [stat.S_IMODE(os.stat(p).st_mode) for p in progress_paths(out)]
        log.finish([key("a")])
        modes.append(stat.S_IMODE(os.stat(out).st_mode))
    finally:
        os.umask(previous)
    assert modes == [0o640, 0o640, 0o640]


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: os.mkfifo(p), "FIFO"),
    (lambda p: p.symlink_to(p.parent / "target.jsonl"), "symbolic link"),
])
def test_output_paths_that_are_not_plain_files_are_refused(tmp_path, make, fragment):
    out = tmp_path / "out.jsonl"
    (tmp_path / "target.jsonl").write_text("keep me\n")
    make(out)
    with pytest.raises(UserError, match=fragment):
        open_for_resume(out, IDENTITY)
    assert (tmp_path / "target.jsonl").read_text() == "keep me\n"


def test_a_device_a_missing_folder_and_the_input_are_refused(tmp_path):
    with pytest.raises(UserError, match="is a device"):
        check_output_path("/dev/null")
    with pytest.raises(UserError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "out.jsonl")
    with pytest.raises(UserError, match="names a folder"):
        check_output_path(f"{tmp_path}/new/")
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    with pytest.raises(UserError, match="is the input file"):
        check_output_path(src, input_path=src)
    check_output_path("-")


@pytest.mark.parametrize("which", [0, 1])
def test_a_link_planted_at_a_progress_path_is_not_followed(tmp_path, which):
    out = tmp_path / "out.jsonl"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    progress_paths(out)[which].symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        open_for_resume(out, IDENTITY)
    assert victim.read_text() == "precious\n"


def test_stdout_prints_in_input_order_and_says_it_cannot_resume(caplog):
    stream = io.StringIO()
    log = open_for_resume("-", IDENTITY, stream=stream)
    assert isinstance(log, StdoutLog) and "cannot resume" in caplog.text
    log.append([row("b")])
    log.append([row("a")])
    log.finish([key("a"), key("b")])
    assert [json.loads(line)["id"] for line in stream.getvalue().splitlines()] == ["a", "b"]


CHILD = r"""
import json, os, pathlib, signal, sys, types
# Load the package's modules without its __init__ (which imports the engine and torch): this
# keeps each child quick and checks that the job-file layer needs no torch.
package = types.ModuleType("flexgen_dist")
package.__path__ = [os.path.join(sys.argv[4], "flexgen_dist")]
sys.modules["flexgen_dist"] = package
from flexgen_dist.jobs import resume

out, point, block_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = [f"r{i}" for i in range(12)] + [12, 13]
identity = resume.RunIdentity(model="m", input_sha256="h" * 64, settings={"max_new_tokens": 4})

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

log = resume.open_for_resume(out, identity)
pending = [i for i in ids if json.dumps(i) not in log.finished]
blocks = [pending[k:k + 3] for k in range(0, len(pending), 3)]
for block_idx, block in enumerate(blocks):
    if block_idx == block_at:
        if point == "before_write":
            die()
        if point in ("mid_write", "mid_write_late"):  # cut inside the first line, or inside the last
            real_write_all = resume.write_all
            def torn(fd, data):
                real_write_all(fd, data[:10] if point == "mid_write" else data[:-5])
                die()
            resume.write_all = torn
        if point == "before_fsync":  # the lines are written, the fsync never happens
            os.fsync = die
    log.append([{"id": i, "output_ids": [len(str(i))], "text": f"out {i}"} for i in block])
    if block_idx == block_at and point == "after_fsync":
        die()
if point == "before_rename":
    os.replace = die
if point in ("before_unlink_progress", "between_unlinks"):
    suffix = ".partial" if point == "before_unlink_progress" else ".run.json"
    real_unlink = pathlib.Path.unlink
    def unlink(path, *args, **kwargs):
        if path.name.endswith(suffix):
            die()
        return real_unlink(path, *args, **kwargs)
    pathlib.Path.unlink = unlink
log.finish([json.dumps(i) for i in ids])
assert "torch" not in sys.modules
"""
ALL_IDS = [f"r{i}" for i in range(12)] + [12, 13]


def run_child(out, point="none", block_at=-1):
    return subprocess.run([sys.executable, "-c", CHILD, str(out), point, str(block_at), str(REPO)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out.jsonl"
    proc = run_child(out)
    assert proc.returncode == 0, proc.stderr
    assert ids_in(out) == ALL_IDS
    return out.read_bytes()


# point, block, ids finished when the killed run is reopened, whether the output exists then
KILL_POINTS = [
    ("before_write", 2, 6, False),
    ("mid_write", 0, 0, False),
    ("mid_write", 2, 6, False),
    ("mid_write_late", 2, 8, False),  # the block's first two lines are whole: they count
    ("before_fsync", 2, 9, False),  # written but not fsynced: a killed process loses nothing
    ("after_fsync", 4, 14, False),
    ("before_rename", -1, 14, False),
    ("before_unlink_progress", -1, 14, True),
    ("between_unlinks", -1, 14, True),  # the output is complete; the rerun only tidies up
]


@pytest.mark.parametrize("point, block_at, finished, output_exists", KILL_POINTS)
def test_sigkill_then_resume_gives_the_uninterrupted_output(tmp_path, uninterrupted, point, block_at, finished,
                                                             output_exists):
    out = tmp_path / "out.jsonl"
    proc = run_child(out, point, block_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert out.exists() == output_exists
    log = open_for_resume(out, RunIdentity(model="m", input_sha256="h" * 64, settings={"max_new_tokens": 4}))
    assert len(log.finished) == finished
    assert log.complete == (point == "between_unlinks")
    if log.complete:  # nothing left to run: finish() checks the ids and the state is a finished run's
        log.finish([key(i) for i in ALL_IDS])
        assert "already exists" in run_child(out).stderr
    else:
        log.close()
        proc = run_child(out)
        assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == uninterrupted
    assert not any(p.exists() for p in progress_paths(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temporary file left
