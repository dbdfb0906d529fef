"""Memory cgroups (v1 or v2) for capped benchmark runs: find a writable hierarchy, make a child
group with a memory limit, read its peak and OOM events, remove it."""

from __future__ import annotations

import errno
import itertools
import os
import re
import signal
import time
from pathlib import Path

_counter = itertools.count()


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, fs type, options) of every cgroup mount."""
    found = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
                    mount_point = fields[1].replace("\\040", " ")
                    found.append((mount_point, fields[2], fields[3].split(",")))
    except OSError:
        pass
    return found


def _own_cgroup(controller: str | None) -> str:
    """This process's group path in the v1 hierarchy of `controller` (None: the v2 one)."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                names = controllers.split(",") if controllers else []
                if (controller is None and controllers == "") or (controller in names):
                    return path
    except OSError:
        pass
    return "/"


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


class Cgroup:
    """One memory group created for one child; `cleanup` kills what is left in it and removes it."""

    def __init__(self, version: int, path: Path):
        self.version = version
        self.path = path

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    def read_int(self, name: str) -> int | None:
        text = self.read(name)
        try:
            return int(text.split()[0]) if text else None
        except ValueError:
            return None

    def peak(self) -> int | None:
        return self.read_int("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")

    def oom_kills(self) -> int | None:
        """OOM kills inside the group, or None where the kernel does not count them."""
        text = self.read("memory.oom_control" if self.version == 1 else "memory.events")
        match = re.search(r"^oom_kill (\d+)$", text or "", re.M)
        return int(match.group(1)) if match else None

    def hit_limit(self) -> bool:
        if self.version == 1:
            return (self.read_int("memory.failcnt") or 0) > 0
        match = re.search(r"^max (\d+)$", self.read("memory.events") or "", re.M)
        return bool(match and int(match.group(1)) > 0)

    def pids(self) -> list[int]:
        return [int(p) for p in (self.read("cgroup.procs") or "").split()]

    def cleanup(self) -> None:
        for _ in range(50):
            pids = self.pids()
            for pid in pids:  # stragglers of our own child (it may have forked)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY:
                    return
            time.sleep(0.05)


def _new_group(version: int, parent: Path, limits: list[tuple[str, str]]) -> Cgroup | None:
    """A fresh child group of `parent` with `limits` written in order (a file the kernel does
    not offer, such as swap accounting, is skipped); None when it cannot be made."""
    path = parent / f"flexgen-bench-{os.getpid()}-{next(_counter)}"
    try:
        path.mkdir()
    except OSError:
        return None
    group = Cgroup(version, path)
    try:
        for name, value in limits:
            if (path / name).exists():
                (path / name).write_text(value)
        return group
    except OSError:
        group.cleanup()
        return None


def make_cgroup_v1(limit: int) -> Cgroup | None:
    mount = next((m for m, fstype, opts in _mounts() if fstype == "cgroup" and "memory" in opts), None)
    if mount is None:
        return None
    own = Path(mount) / _own_cgroup("memory").lstrip("/")
    # Below our own group when we may write there (the limits above still apply and the charge
    # stays where it belongs); the hierarchy's root otherwise.
    for parent in (own, Path(mount)):
        if not _writable_dir(parent) or not (parent / "memory.limit_in_bytes").exists():
            continue
        # memsw >= mem is required, so it is written after the limit
        group = _new_group(1, parent, [("memory.limit_in_bytes", str(limit)), ("memory.memsw.limit_in_bytes", str(limit))])
        if group is not None:
            return group
    return None


def make_cgroup_v2(limit: int) -> Cgroup | None:
    mounts = [m for m, fstype, _ in _mounts() if fstype == "cgroup2"]
    own_path = _own_cgroup(None).lstrip("/")
    for mount in mounts:
        for parent in (Path(mount) / own_path, Path(mount)):
            if not _writable_dir(parent):
                continue
            subtree = parent / "cgroup.subtree_control"
            try:
                if "memory" not in subtree.read_text().split():
                    # Fails when the parent holds processes itself (v2's "no internal processes").
                    subtree.write_text("+memory")
            except OSError:
                continue
            group = _new_group(2, parent, [("memory.max", str(limit)), ("memory.swap.max", "0")])
            if group is not None:
                return group
    return None


def cgroup_support() -> str:
    """'cgroup-v1', 'cgroup-v2' or 'rlimit-as': what `run_limited` would use here for a cap
    (creates and removes an empty test group)."""
    for version, make in ((1, make_cgroup_v1), (2, make_cgroup_v2)):
        group = make(1 << 40)
        if group is not None:
            group.cleanup()
            return f"cgroup-v{version}"
    return "rlimit-as"
