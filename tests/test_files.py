"""flexgen_dist.files, the one module that writes files: one temporary-name scheme for every
writer, writes that raise instead of looping or tearing, fsyncs that report failure, and a sweep
that deletes only this tool's temporary files of the exact name whose writer is provably gone."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flexgen_dist import files, temp_names
from flexgen_dist.errors import EnvironmentFailure
from flexgen_dist.files import atomic_output, remove_stale_temps, write_all, write_atomic
from flexgen_dist.temp_names import TEMP_TAG, host_tag, temp_name, temp_pattern

REPO = Path(__file__).resolve().parents[1]
# Output names whose characters mean something to glob(): the old sweep's pattern was built from them.
HOSTILE_NAMES = ["out.jsonl", "a[b].jsonl", "*.jsonl", "q?.jsonl", "we ird*?[].jsonl", "x\nnewline.jsonl"]


def _temp(name: str, pid: int, *, host: str | None = None, n: int = 0) -> str:
    """A temporary name as a writer with `pid` on `host` would make it for `name`."""
    return f".{name}.{TEMP_TAG}.{host or host_tag()}.{pid}.{n:016x}"


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    if psutil.pid_exists(proc.pid):
        pytest.skip("the pid of the finished child was reused already")
    return proc.pid


@pytest.fixture
def live_child():
    """A process that stays alive until the test closes its standard input."""
    proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    yield proc
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait()


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_the_sweep_removes_only_dead_temporaries_of_that_exact_name(tmp_path, name, dead_pid, live_child):
    ours_dead = _temp(name, dead_pid)
    ours_live_child = _temp(name, live_child.pid, n=1)  # a writer running now, in another process
    ours_live_self = _temp(name, os.getpid(), n=2)  # one of this process's own writes
    others = [
        name, f"{name}.partial",  # the output itself and its progress file
        f".{name}.tmp", f".{name}.x.tmp",  # the user's own hidden files
        f".{name}.{dead_pid}.0123abcd.tmp",  # looks like an old version's temporary file: not this pattern
        *(_temp(other, dead_pid, n=3) for other in (  # dead writers' files of other outputs
            f"{name}.2", "ab.jsonl", "x.jsonl", "q1.jsonl", f"{name}.run.json", name[:-1], f"x{name}")),
        f"{ours_dead}0", ours_dead[:-1], ours_dead.upper(), f"{ours_dead}.tmp",  # near misses of the pattern
    ]
    for entry in [ours_dead, ours_live_child, ours_live_self, *others]:
        (tmp_path / entry).write_bytes(b"x")
    assert remove_stale_temps(tmp_path, name) == [ours_dead]
    assert _listing(tmp_path) == {ours_live_child, ours_live_self, *others}
    live_child.stdin.close()
    live_child.wait()  # its writer is gone now: its file is a leftover
    assert remove_stale_temps(tmp_path, name) == [ours_live_child]
    assert _listing(tmp_path) == {ours_live_self, *others}


def test_reused_pids_and_other_hosts(tmp_path):
    me = os.getpid()
    before_me = psutil.Process(me).create_time() - 3600
    names = {
        "reused": _temp("out.jsonl", me, n=1),  # our pid, but last written before we started
        "foreign_recent": _temp("out.jsonl", 12, host="otherhost", n=2),
        "foreign_stale": _temp("out.jsonl", 12, host="otherhost", n=3),
    }
    for entry in names.values():
        (tmp_path / entry).write_bytes(b"x")
    os.utime(tmp_path / names["reused"], (before_me, before_me))
    stale = time.time() - temp_names.FOREIGN_STALE_S - 3600
    os.utime(tmp_path / names["foreign_stale"], (stale, stale))
    assert sorted(remove_stale_temps(tmp_path, "out.jsonl")) == sorted([names["reused"], names["foreign_stale"]])
    assert _listing(tmp_path) == {names["foreign_recent"]}


def test_links_and_folders_under_a_temporary_name(tmp_path, dead_pid):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = tmp_path / "out"
    folder.mkdir()
    link, subfolder = _temp("out.jsonl", dead_pid, n=1), _temp("out.jsonl", dead_pid, n=2)
    (folder / link).symlink_to(victim)
    (folder / subfolder).mkdir()
    (folder / subfolder / "inside").write_text("x")
    assert remove_stale_temps(folder, "out.jsonl") == [link]  # a link is unlinked, never followed
    assert victim.read_text() == "precious\n" and _listing(folder) == {subfolder}
    assert remove_stale_temps(folder, "out.jsonl", folders=True) == [subfolder]  # only when asked
    assert _listing(folder) == set()


def test_a_second_writer_keeps_a_live_writers_temporary_file(tmp_path):
    """Another process writes the same output while this one is in the middle of writing it:
    its sweep must not delete our temporary file, and both writes land whole."""
    out = tmp_path / "out.jsonl"
    other = ("import sys; from flexgen_dist.files import write_atomic; "
             "write_atomic(sys.argv[1], b'from the other process\\n')")
    with atomic_output(out) as f:
        f.write(b"ours\n")
        [ours] = [p.name for p in tmp_path.iterdir()]
        assert temp_pattern(out.name).fullmatch(ours)
        done = subprocess.run([sys.executable, "-c", other, str(out)], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert _listing(tmp_path) == {ours, out.name}
    assert out.read_bytes() == b"ours\n" and _listing(tmp_path) == {out.name}


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_output_names_round_trip(tmp_path, name, dead_pid):
    out = tmp_path / name
    leftover, neighbour = _temp(name, dead_pid), _temp(f"{name}.2", dead_pid)
    (tmp_path / leftover).write_bytes(b"killed mid-write")
    (tmp_path / neighbour).write_bytes(b"not ours to judge")
    write_atomic(out, b"new\n")
    assert out.read_bytes() == b"new\n"
    assert _listing(tmp_path) == {name, neighbour}  # its own leftover is gone, the other output's kept


def test_long_names_get_short_temporary_names(tmp_path, dead_pid):
    name = "x" * 250  # a name the file system takes; with a suffix added, it would not
    twin = "x" * 249 + "y"
    assert len(os.fsencode(temp_name(name))) <= 255
    assert temp_pattern(name).fullmatch(temp_name(name)) and not temp_pattern(twin).fullmatch(temp_name(name))
    leftover = re.sub(r"\.[0-9]+\.([0-9a-f]{16})$", f".{dead_pid}.\\1", temp_name(name))
    (tmp_path / leftover).write_bytes(b"x")
    write_atomic(tmp_path / name, b"long\n")
    assert (tmp_path / name).read_bytes() == b"long\n" and _listing(tmp_path) == {name}


def test_a_write_of_zero_bytes_raises_instead_of_looping(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"old\n")
    calls = []

    def writes_nothing(fd, data):
        calls.append(len(data))
        if len(calls) > 100:
            raise AssertionError("os.write returned 0 a hundred times and the writer kept trying")
        return 0

    monkeypatch.setattr(os, "write", writes_nothing)
    with pytest.raises(EnvironmentFailure, match="wrote 0 of the 5 bytes left") as info:
        write_atomic(out, b"new!\n")
    assert "\n" not in str(info.value) and str(out) in str(info.value)
    assert len(calls) == 1
    assert out.read_bytes() == b"old\n" and _listing(tmp_path) == {"out.jsonl"}


def test_partial_writes_go_on(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    data = bytes(range(256)) * 40
    write_atomic(tmp_path / "out.bin", data)
    fd = os.open(tmp_path / "p.bin", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        write_all(fd, memoryview(data))
        files.pwrite_all(fd, b"abcdefg", 5)
    finally:
        os.close(fd)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert (tmp_path / "p.bin").read_bytes() == data[:5] + b"abcdefg" + data[12:]


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"old\n")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(EnvironmentFailure, match="the disk is full") as info:
        write_atomic(out, b"new\n")
    assert "\n" not in str(info.value)
    assert out.read_bytes() == b"old\n" and _listing(tmp_path) == {"out.jsonl"}


@pytest.mark.parametrize("which", ["file", "folder"])
def test_a_failed_fsync_is_raised(tmp_path, monkeypatch, which):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"old\n")
    real_fsync = os.fsync

    def failing(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode) == (which == "folder"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(EnvironmentFailure, match=r"I/O error \(EIO\)"):
        write_atomic(out, b"new\n")
    # A failed file fsync: the old file stays. A failed folder fsync: the rename is done, but
    # whether it survives a crash is unknown, and the caller hears of it.
    assert out.read_bytes() == (b"old\n" if which == "file" else b"new\n")
    assert _listing(tmp_path) == {"out.jsonl"}


def test_a_file_system_that_cannot_sync_folders_is_fine(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def no_folder_sync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", no_folder_sync)
    write_atomic(tmp_path / "out.jsonl", b"new\n")
    assert (tmp_path / "out.jsonl").read_bytes() == b"new\n"


def test_an_exception_in_the_block_removes_the_temporary_file(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"old\n")
    with pytest.raises(KeyError):
        with atomic_output(out) as f:
            f.write(b"half")
            raise KeyError("the caller's own error, passed on as it is")
    assert out.read_bytes() == b"old\n" and _listing(tmp_path) == {"out.jsonl"}


def _writers():
    """Every writer of the package that replaces a file, as (name, write(folder) -> target name)."""
    from flexgen_dist.bench.sweep import write_csv
    from flexgen_dist.files import write_json_file
    from flexgen_dist.machine.presets import FLEXGEN_T4

    def offload(folder):
        from flexgen_dist.storage.offload_dir import write_file

        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            write_file(dir_fd, "w.bin", memoryview(b"abc"), folder)
        finally:
            os.close(dir_fd)
        return "w.bin"

    return {
        "hardware profile": lambda folder: FLEXGEN_T4.save(folder / "hw.json") or "hw.json",
        "--stats-json": lambda folder: write_json_file(folder / "s.json", {"a": 1}, flag="--stats-json") or "s.json",
        "sweep csv": lambda folder: write_csv([], folder / "sweep.csv") or "sweep.csv",
        "offload folder": offload,
    }


@pytest.mark.parametrize("writer", ["hardware profile", "--stats-json", "sweep csv", "offload folder"])
def test_every_writer_uses_the_one_scheme(tmp_path, monkeypatch, writer):
    real_replace, moved = os.replace, []

    def spy(src, dst, **kwargs):
        moved.append((os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    target = _writers()[writer](tmp_path)
    [(src, dst)] = moved
    assert dst == target and temp_pattern(target).fullmatch(src), (src, dst)
    assert _listing(tmp_path) == {target}


# Files that write other than through flexgen_dist.files, and why that is right for them.
WRITES_OF_THEIR_OWN = {
    "files.py": "the module itself",
    "jobs/resume.py": "the progress file is appended in place (O_APPEND, fsync per block); a torn line is cut",
    "storage/tiers.py": "a block's tensor file, created O_EXCL in a private folder, written in place (pwrite_all)",
    "machine/microbench.py": "the measured scratch file (named by temp_name, created O_EXCL) and its raw write speed",
    "bench/cgroups.py": "cgroup control files of the kernel, which cannot be replaced",
    "bench/memlimit.py": "a cgroup's procs file of the kernel, which cannot be replaced",
    "bench/checkpoints.py": "a whole folder (named by temp_name) renamed into place",
    "planning/lp.py": "os.devnull",
    "cli/streams.py": "os.devnull on a closed standard descriptor (0, 1, 2)",
    "parallel/rendezvous.py": "os.devnull over descriptor 2 while c10d's C++ client logs its retries",
}
_WRITE = re.compile(r"os\.replace\(|os\.rename\(|\.rename\(|\.replace\(tmp|write_text\(|write_bytes\(|"
                    r"open\([^)]*[\"'][wax]b?\+?[\"']|O_CREAT|O_WRONLY|O_RDWR|\.savefig\(\w*path|\.tmp\b")


def test_one_module_writes_every_file():
    package = REPO / "flexgen_dist"
    found = set()
    for source in package.rglob("*.py"):
        if _WRITE.search(source.read_text()):
            found.add(source.relative_to(package).as_posix())
    assert found - set(WRITES_OF_THEIR_OWN) == set(), "write through flexgen_dist.files"
