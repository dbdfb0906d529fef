"""The memory cgroup limit that binds this process (v1 and v2; pure Python, no torch).

Every memory cgroup this process is in (a container's or a SLURM job's limit) is read, v1 and v2,
walking up from the process's group to the hierarchy's root: its limit, and its working set
(usage minus inactive file cache, which the kernel reclaims before it OOM-kills; active file
cache is counted as used, which errs on the safe side). v2's memory.high counts as a limit:
above it the kernel throttles the group hard. The group with the least headroom binds.
`detect.host_memory` takes the smaller of that headroom and what psutil says is available.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


# cgroup v1 writes "no limit" as the largest page-counter value (2^63 - 4096 on 4 KiB pages,
# rounded to the page size); anything this large (1 EiB) is no limit either.
V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class CgroupMemory:
    """The memory limit that binds this process: the group with the least headroom."""

    version: int
    """1 or 2: which cgroup hierarchy."""
    group: Path
    """The group folder holding the limit (this process's own group or one of its ancestors)."""
    limit: int
    """Bytes: memory.max / memory.high (v2) or memory.limit_in_bytes (v1)."""
    working_set: int
    """Bytes the group uses that the kernel will not reclaim: usage minus inactive file cache."""

    @property
    def headroom(self) -> int:
        return max(0, self.limit - self.working_set)


@dataclass(frozen=True)
class _Mount:
    mount_point: str  # where it is mounted (absolute, in this process's view)
    root: str  # which folder of the hierarchy the mount shows
    fstype: str
    super_options: tuple[str, ...]


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def _mounts(root: Path) -> list[_Mount]:
    try:
        lines = (root / "proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        mounts.append(_Mount(_unescape(fields[4]), _unescape(fields[3]), tail[0], tuple(tail[2].split(","))))
    return mounts


def _own_groups(root: Path) -> list[tuple[list[str], str]]:
    """(controllers, group path) per line of /proc/self/cgroup; v2 has no controllers."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    groups = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            groups.append(([c for c in parts[1].split(",") if c], parts[2]))
    return groups


def _group_dir(root: Path, mount: _Mount, group_path: str) -> tuple[Path, Path]:
    """(the group's folder, the mount's folder), both under `root`.

    The group path is relative to the hierarchy's root and the mount may show a subtree of it
    (a container without a cgroup namespace sees /docker/<id> mounted at /sys/fs/cgroup/...):
    strip the mount's root. A group outside the mounted subtree ("/../x" in a cgroup namespace)
    or missing on disk: the mount's folder, the nearest group this process can see.
    """
    mount_dir = root / mount.mount_point.lstrip("/")
    mount_root = mount.root.rstrip("/")
    if group_path == mount_root or group_path.startswith(mount_root + "/"):
        relative = group_path[len(mount_root):].lstrip("/")
        group_dir = mount_dir / relative
        if ".." not in Path(relative).parts and group_dir.is_dir():
            return group_dir, mount_dir
    return mount_dir, mount_dir


def _up_to(group_dir: Path, mount_dir: Path) -> Iterator[Path]:
    path = group_dir
    while True:
        yield path
        if path == mount_dir or path.parent == path:
            return
        path = path.parent


def _read_int(path: Path) -> int | None:
    """An integer file; None when absent, unreadable or "max"."""
    try:
        text = path.read_text().split()
    except OSError:
        return None
    if not text or text[0] == "max":
        return None
    try:
        return int(text[0])
    except ValueError:
        return None


def _stat_value(path: Path, keys: tuple[str, ...]) -> int:
    """The first of `keys` found in a memory.stat file, else 0."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    values = dict(line.split(maxsplit=1) for line in lines if len(line.split()) == 2)
    for key in keys:
        if key in values and values[key].isdigit():
            return int(values[key])
    return 0


def _limits_v2(group_dir: Path, mount_dir: Path) -> Iterator[CgroupMemory]:
    for path in _up_to(group_dir, mount_dir):
        limits = [v for v in (_read_int(path / "memory.max"), _read_int(path / "memory.high")) if v is not None]
        if limits:
            usage = _read_int(path / "memory.current") or 0
            inactive = _stat_value(path / "memory.stat", ("inactive_file",))
            yield CgroupMemory(2, path, min(limits), max(0, usage - inactive))


def _limits_v1(group_dir: Path, mount_dir: Path) -> Iterator[CgroupMemory]:
    for path in _up_to(group_dir, mount_dir):
        limit = _read_int(path / "memory.limit_in_bytes")
        if limit is not None and limit < V1_UNLIMITED:
            usage = _read_int(path / "memory.usage_in_bytes") or 0
            # total_* counts the group's descendants too, as usage_in_bytes does
            inactive = _stat_value(path / "memory.stat", ("total_inactive_file", "inactive_file"))
            yield CgroupMemory(1, path, limit, max(0, usage - inactive))


def cgroup_memory(root: Path = Path("/")) -> CgroupMemory | None:
    """The memory limit with the least headroom over this process's cgroups (v1 and v2 together:
    a hybrid host may limit in either), or None where no group is limited.

    `root` is the file system's root, so tests can build a fake /proc and /sys/fs/cgroup."""
    groups = _own_groups(root)
    v2_path = next((path for controllers, path in groups if not controllers), None)
    v1_path = next((path for controllers, path in groups if "memory" in controllers), None)
    found: list[CgroupMemory] = []
    for mount in _mounts(root):
        if mount.fstype == "cgroup2" and v2_path is not None:
            found.extend(_limits_v2(*_group_dir(root, mount, v2_path)))
        elif mount.fstype == "cgroup" and "memory" in mount.super_options and v1_path is not None:
            found.extend(_limits_v1(*_group_dir(root, mount, v1_path)))
    return min(found, key=lambda c: c.headroom, default=None)
