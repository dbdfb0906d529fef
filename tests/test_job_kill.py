"""A running job killed and resumed: SIGKILL at six points of one chain of reruns (during the
first block, after a block is saved, in the middle of writing a block, while the weights load,
while the output is written, after it is complete) and once from outside while it runs on after
its first block is saved; SIGINT and SIGTERM keep what is finished, remove the scratch files and
exit 130 / 143. After every kill no result is lost, duplicated or changed, and the last rerun's
output is the uninterrupted run's, byte for byte. Children kill themselves at the point or print
a line and wait: every step waits for an event, never for a time."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flexgen_dist.jobs.outputs import progress_paths
from flexgen_dist.cli.shell import HeldSignals, Interrupted, StopSignals
from flexgen_dist.run import main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
NEW_TOKENS = 6

CHILD = r"""
import json, os, pathlib, signal, sys
from flexgen_dist import run
from flexgen_dist.engine import blocks, refill
from flexgen_dist.jobs import run as job; from flexgen_dist.cli import progress; from flexgen_dist.jobs import resume

point, argv = sys.argv[1], json.loads(sys.argv[2])

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "first_block":  # the third token of this run's first block: nothing saved by it
    for state in (blocks.BlockState, refill.RefillState):  # a block with rows refilled, or not
        def record_then_die(self, token_idx, batch_idx, ids, record=state.record_tokens):
            record(self, token_idx, batch_idx, ids)
            if token_idx == 2:
                die()
        state.record_tokens = record_then_die
elif point == "after_block":  # the first block's lines are written and fsynced
    append = resume.ResumeLog.append
    def append_then_die(self, rows):
        append(self, rows)
        die()
    resume.ResumeLog.append = append_then_die
elif point == "mid_write":  # the second block's lines are half written
    write_all, calls = resume.write_all, []
    def torn(fd, data):
        calls.append(fd)
        if len(calls) == 2:
            write_all(fd, data[: len(data) // 2])
            die()
        write_all(fd, data)
    resume.write_all = torn
elif point == "loading":  # the output is open, the weights are loading
    job.LLM = die
elif point == "finishing":  # every block is saved; the output is written but not yet renamed
    finish = job.LogSink.finish
    def finish_then_die(self):
        os.replace = die
        finish(self)
    job.LogSink.finish = finish_then_die
elif point == "finished":  # the output is complete; the run record is not removed yet
    unlink = pathlib.Path.unlink
    def unlink_or_die(path, *args, **kwargs):
        if path.name.endswith(".run.json"):
            die()
        return unlink(path, *args, **kwargs)
    pathlib.Path.unlink = unlink_or_die
elif point == "wait_after_block":  # say when a block is saved, then wait (for a signal)
    update = progress.Progress.update
    def update_then_wait(self, prompts, tokens):
        update(self, prompts, tokens)
        print("block saved", flush=True)
        sys.stdin.readline()
    progress.Progress.update = update_then_wait
elif point == "hold_finish":  # say when each block is saved and go on; wait before the output is finished
    update, finish = progress.Progress.update, job.LogSink.finish
    def update_then_say(self, prompts, tokens):
        update(self, prompts, tokens)
        print("block saved", flush=True)
    def wait_then_finish(self):
        sys.stdin.readline()  # the test never answers: it kills first
        finish(self)
    progress.Progress.update, job.LogSink.finish = update_then_say, wait_then_finish
sys.exit(run.main(argv))
"""


def job_args(model, src, out, *extra):
    # fp32 on the CPU: on a GPU machine the default (CUDA, 16 bits) need not give the same bytes
    # across the block shapes a killed and a resumed run compare
    return ["--model", str(model), "--input", str(src), "--output", str(out), "--max-new-tokens", str(NEW_TOKENS),
            "--gpu-batch-size", "2", "--no-warmup", "--quiet", "--device", "cpu", *map(str, extra)]


def start_child(point, args):
    return subprocess.Popen([sys.executable, "-c", CHILD, point, json.dumps(args)], env=ENV, cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_in_process(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    for handler in list(logging.getLogger().handlers):  # installed on the captured stderr
        if getattr(handler, "_flexgen_dist", False):
            logging.getLogger().removeHandler(handler)
    assert code == 0, err
    return out


def lines_by_id(path):
    rows = [json.loads(line) for line in path.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows), "an id was written twice"
    return by_id


@pytest.fixture(scope="module")
def job(llama_dir, unambiguous_prompts, tmp_path_factory):
    """12 prompts of several lengths (6 blocks of 2) and the uninterrupted run's output."""
    root = tmp_path_factory.mktemp("kill")
    prompts = unambiguous_prompts(llama_dir, [3, 11, 5, 17, 8, 2, 13, 6, 9, 4, 12, 7], NEW_TOKENS, seed=4)
    src = root / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "input_ids": p}) + "\n" for i, p in enumerate(prompts)))
    return llama_dir, src, root


@pytest.fixture(scope="module")
def reference(job):
    model, src, root = job
    out = root / "reference.jsonl"
    assert main(job_args(model, src, out)) == 0
    for handler in list(logging.getLogger().handlers):
        if getattr(handler, "_flexgen_dist", False):
            logging.getLogger().removeHandler(handler)
    return out.read_bytes()


# point, results saved after the kill (a torn line aside), whether the output exists then
CHAIN = [
    ("first_block", 0, False),
    ("after_block", 2, False),
    ("mid_write", 4, False),
    ("loading", 4, False),
    ("finishing", 12, False),
    ("finished", None, True),
]


def test_sigkill_at_six_points_then_resume_loses_and_repeats_nothing(job, reference, tmp_path, capsys):
    model, src, _ = job
    out = tmp_path / "out.jsonl"
    partial, record = progress_paths(out)
    expected = {json.loads(line)["id"]: json.loads(line) for line in reference.splitlines()}
    for point, saved, complete in CHAIN:
        child = start_child(point, job_args(model, src, out))
        _, err = child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL, (point, err)
        assert out.exists() == complete and record.exists(), point
        if saved is not None:
            found = lines_by_id(partial)
            assert len(found) == saved, point
            assert all(row == expected[key] for key, row in found.items()), point  # nothing changed
    assert not partial.exists() and out.read_bytes() == reference
    stdout = run_in_process(job_args(model, src, out), capsys)  # the last rerun tidies up
    assert "already complete: " in stdout
    assert out.read_bytes() == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.made-by.json"]


def test_sigkill_from_outside_once_results_appear(job, reference, tmp_path, capsys):
    """Killed from outside wherever the child is once its first block is saved (it runs on, and
    is only held before the output is finished, so the run cannot end first): the saved results
    survive unchanged and the rerun reuses them."""
    model, src, _ = job
    out = tmp_path / "out.jsonl"
    partial = progress_paths(out)[0]
    child = start_child("hold_finish", job_args(model, src, out))
    assert "block saved\n" in iter(child.stdout.readline, "")  # read up to it: the first block's lines are on disk
    os.kill(child.pid, signal.SIGKILL)
    _, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err
    assert not out.exists()
    expected = {json.loads(line)["id"]: json.loads(line) for line in reference.splitlines()}
    found = lines_by_id(partial)
    assert len(found) >= 2  # at least the first block (a torn last line aside)
    assert all(row == expected[key] for key, row in found.items())
    stdout = run_in_process(job_args(model, src, out), capsys)
    assert f"resumed: {len(found)} of 12 results came from an earlier run" in stdout
    assert out.read_bytes() == reference


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_keep_finished_results_and_remove_scratch(job, reference, tmp_path, capsys, signum):
    model, src, _ = job
    out, offload = tmp_path / "out.jsonl", tmp_path / "offload"
    args = job_args(model, src, out, "--percent", 100, 0, 0, 0, 100, 0, "--offload-dir", offload)  # KV cache on disk
    child = start_child("wait_after_block", args)
    lines = iter(child.stdout.readline, "")
    assert "block saved\n" in lines  # read up to the line that says the first block is saved
    child.send_signal(signum)
    stdout, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signum, err
    last = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last == f"interrupted by {name}: 2 of 12 results are saved in {out}.partial; run the same command again to resume"
    assert len(lines_by_id(progress_paths(out)[0])) == 2
    assert not list(offload.glob(".kv-cache.*")), "the run's scratch files are left behind"
    stdout = run_in_process(args, capsys)
    assert "resumed: 2 of 12 results came from an earlier run" in stdout
    assert out.read_bytes() == reference


def test_the_scratch_folder_of_a_sigkilled_run_is_removed_by_the_next_run(job, reference, tmp_path, capsys):
    from flexgen_dist.temp_names import temp_name

    model, src, _ = job
    out, offload = tmp_path / "out.jsonl", tmp_path / "offload"
    args = job_args(model, src, out, "--percent", 100, 0, 0, 0, 100, 0, "--offload-dir", offload)  # KV cache on disk
    child = start_child("first_block", args)  # SIGKILLs itself while its first block is open
    child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL
    left = list(offload.glob(".kv-cache.*"))
    assert left and all(path.is_dir() for path in left)  # the open block's cache, nobody's now
    alive = offload / temp_name("kv-cache")  # a live run's (this process's) folder: not to be touched
    alive.mkdir()
    (alive / "layer0_batch0_k.bin").write_bytes(b"in use")
    stdout = run_in_process(args, capsys)
    assert out.read_bytes() == reference
    assert list(offload.glob(".kv-cache.*")) == [alive] and (alive / "layer0_batch0_k.bin").read_bytes() == b"in use"


def test_a_signal_while_results_are_saved_waits_for_the_save():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        with StopSignals() as signals:
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                saved = True  # reached: the handler did not cut the section
            raise AssertionError("the deferred signal must be raised when the section ends")
    assert saved and info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are restored


def test_a_signal_held_during_the_start_is_raised_by_the_first_stop_signals():
    original = signal.getsignal(signal.SIGTERM)
    HeldSignals.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # held: the process goes on
        assert isinstance(signal.getsignal(signal.SIGTERM), HeldSignals)
        with pytest.raises(Interrupted) as info:
            with StopSignals():
                raise AssertionError("a held signal must stop the command before its body runs")
    finally:
        if isinstance(signal.getsignal(signal.SIGTERM), HeldSignals):
            signal.signal(signal.SIGTERM, original)
            signal.signal(signal.SIGINT, signal.default_int_handler)
    assert info.value.exit_code == 143
    assert info.value.message == "interrupted by SIGTERM while starting; nothing was done"
    assert signal.getsignal(signal.SIGTERM) is original  # what HeldSignals replaced, not HeldSignals


# The command's module installs HeldSignals before its imports (run.py, under `python -m`);
# here the child installs it, signals itself at once, then runs the command.
EARLY_CHILD = r"""
import json, os, signal, sys
from flexgen_dist.cli.shell import HeldSignals
HeldSignals.install()
signum, count = int(sys.argv[1]), int(sys.argv[2])
for _ in range(count):
    os.kill(os.getpid(), signum)
from flexgen_dist.run import main
sys.exit(main(json.loads(sys.argv[3])))
"""


@pytest.mark.parametrize("signum, count", [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGTERM, 2)])
def test_a_signal_during_the_start_ends_in_one_line(job, tmp_path, signum, count):
    """Once: raised when the job starts; twice (a stuck start): the process leaves at once. Either
    way one line, 128 + the signal, and no output."""
    model, src, _ = job
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-c", EARLY_CHILD, str(int(signum)), str(count),
                           json.dumps(job_args(model, src, out))],
                          capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"interrupted by {name} while starting; nothing was done"]
    assert list(tmp_path.iterdir()) == []
