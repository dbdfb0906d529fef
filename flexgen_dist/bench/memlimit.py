"""Run a benchmark child under a memory cap, measure its peak memory, and evict files from the
page cache so that a capped run reads from the disk.

Why a cgroup: a disk-offloading system measured on a machine with free RAM reads its "disk"
weights from the page cache, i.e. from memory. A memory cgroup charges the page cache its child
fills to the child's limit, so under a cap smaller than the model the reads must go to the disk.

`run_limited` picks, in order:
1. cgroup v1 (`memory` controller mounted, writable: root): a new group below the caller's own
   memory group, `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes`, so swap is no way
   out), peak from `memory.max_usage_in_bytes`, OOM kills from `oom_kill` in `memory.oom_control`.
2. cgroup v2 (a writable unified hierarchy whose parent group delegates `memory`):
   `memory.max` (`memory.swap.max` = 0), peak from `memory.peak`, OOM kills from `memory.events`.
3. `setrlimit(RLIMIT_AS)` in the child. WEAKER: it caps the child's address space, not its page
   cache (a disk-offloading run is not forced to the disk), and programs that reserve address
   space they never touch (torch, glibc arenas) fail under a cap their RSS would fit. An
   allocation over it fails with ENOMEM (`MemoryError` in Python), not a kill; `oom_killed` is then
   guessed from the child's stderr. `limit_method` says which one ran.

The group is removed after the run. Removing a v1/v2 group moves the page cache charged to it to
the parent instead of dropping it: callers that want the next run cold call
`evict_from_page_cache` on the files it reads.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flexgen_dist.bench.cgroups import cgroup_support, make_cgroup_v1, make_cgroup_v2  # noqa: F401 (cgroup_support re-exported)
from flexgen_dist.errors import UserError
from flexgen_dist.sizes import format_size, parse_size

__all__ = ["LimitedRun", "parse_size", "format_size", "evict_from_page_cache", "run_limited", "cgroup_support"]

# ---------------------------------------------------------------- page cache


def _files_under(paths) -> list[Path]:
    files = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(path)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()))
        elif path.is_file():
            files.append(path)
    return files


def evict_from_page_cache(paths) -> int:
    """Drop the page-cache pages of every regular file under `paths` (files or folders, one or a
    list; missing paths are skipped): `fsync` first (dirty pages cannot be dropped, e.g. of a file
    just written), then `posix_fadvise(POSIX_FADV_DONTNEED)`. Returns the bytes of the files
    advised. Pages mapped by a live process stay (the kernel only drops unmapped clean pages)."""
    total = 0
    for path in _files_under(paths):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # vanished or unreadable: nothing of ours to evict
        try:
            try:
                os.fsync(fd)
            except OSError:
                pass  # e.g. a filesystem without fsync; fadvise still drops the clean pages
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


# ---------------------------------------------------------------- capped runs (cgroups.py holds the groups)


@dataclass
class LimitedRun:
    """What `run_limited` saw of one child."""

    returncode: int
    """Exit code; negative = killed by that signal (-9: SIGKILL, e.g. the OOM killer)."""
    stdout: str
    stderr: str
    peak_rss_bytes: int | None
    """Peak resident set of the child process itself (anonymous memory and mapped files, not the
    page cache; not its own children), polled from `VmHWM` in /proc every <= 50 ms; None when
    it exited before the first poll."""
    oom_killed: bool
    """The run died of memory: the cgroup's OOM killer fired (v1 `oom_kill`, v2 `memory.events`,
    or SIGKILL after hitting the limit), or under RLIMIT_AS the child failed to allocate."""
    limit_method: str
    """"none", "cgroup-v1 <dir>", "cgroup-v2 <dir>" or "rlimit-as (weaker: ...)"."""
    mem_limit: int | None = None
    """The cap asked for, in bytes (None: none)."""
    peak_cgroup_bytes: int | None = None
    """Peak memory charged to the cgroup (RSS + page cache + kernel), when one was used."""
    wall_s: float = 0.0
    timed_out: bool = False
    """Killed after `timeout_s` (returncode is then -9 and oom_killed False)."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.oom_killed and not self.timed_out

    def describe_failure(self) -> str:
        """One line saying why the run failed ('' when it did not)."""
        if self.ok:
            return ""
        if self.timed_out:
            return f"timed out after {self.wall_s:.0f} s"
        if self.oom_killed:
            return f"out of memory under the {format_size(self.mem_limit)} cap ({self.limit_method})"
        last = next((ln for ln in reversed(self.stderr.strip().splitlines()) if ln.strip()), "")
        return f"exit code {self.returncode}" + (f": {last.strip()[:300]}" if last else "")


_RLIMIT_NOTE = "rlimit-as (weaker: caps the address space, not the page cache)"
_ALLOC_FAILURE = re.compile(
    r"MemoryError|Cannot allocate memory|can't allocate memory|std::bad_alloc|"
    r"DefaultCPUAllocator: not enough memory|out of memory",
    re.I,
)


def _vm_hwm(pid: int) -> int | None:
    """Peak RSS in bytes of a live process (VmHWM), None when it is gone or has no memory."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _preexec(procs_file: str | None, rlimit_as: int | None):
    """The function the child runs between fork and exec: join the group (so everything it
    allocates from then on is charged there) or set its address-space limit. Only os calls."""

    def join():
        os.setsid()  # own process group: a timeout kills the child and what it started
        if procs_file is not None:
            fd = os.open(procs_file, os.O_WRONLY)
            try:
                os.write(fd, b"0")  # "0" = the writing process itself
            finally:
                os.close(fd)
        if rlimit_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, (rlimit_as, rlimit_as))

    return join


def run_limited(
    cmd: list[str],
    *,
    mem_limit: int | None,
    env: dict | None = None,
    timeout_s: float | None = None,
    method: str = "auto",
    cwd: str | os.PathLike | None = None,
) -> LimitedRun:
    """Run `cmd` to completion, capturing its stdout and stderr (text), with at most `mem_limit`
    bytes of memory (None: no cap) and measure its peak memory.

    `method`: "auto" (cgroup v1, then v2, then RLIMIT_AS; see the module docstring), "cgroup"
    (v1 or v2, else `UserError`) or "rlimit" (RLIMIT_AS only). `timeout_s`: kill the child (and
    everything in its group) after that long; the result then has `timed_out=True`.
    """
    if method not in ("auto", "cgroup", "rlimit"):
        raise UserError(f"unknown memory-limit method {method!r}; use auto, cgroup or rlimit")
    group = None
    rlimit_as = None
    limit_method = "none"
    if mem_limit is not None:
        mem_limit = parse_size(mem_limit)
        if method in ("auto", "cgroup"):
            group = make_cgroup_v1(mem_limit) or make_cgroup_v2(mem_limit)
        if group is not None:
            limit_method = f"cgroup-v{group.version} {group.path}"
        elif method == "cgroup":
            raise UserError(
                "cannot create a memory cgroup here (needs root and a writable cgroup v1 `memory` "
                "hierarchy or a cgroup v2 one that delegates `memory`); run as root or use method='rlimit'"
            )
        else:
            rlimit_as = mem_limit
            limit_method = _RLIMIT_NOTE

    start = time.perf_counter()
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            preexec_fn=_preexec(group.procs_file if group else None, rlimit_as),
        )
    except BaseException:
        if group is not None:
            group.cleanup()
        raise

    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def drain(name, stream):
        for block in iter(lambda: stream.read1(1 << 16), b""):
            chunks[name].append(block)
        stream.close()

    readers = [threading.Thread(target=drain, args=(n, s), daemon=True) for n, s in
               (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for reader in readers:
        reader.start()

    # The peak RSS is polled from /proc (VmHWM, the high-water mark of the child's own address
    # space, which starts fresh at exec). Not ru_maxrss: Linux carries the parent's high-water
    # mark over fork and exec into the child's, so a child of a big benchmark process would
    # report at least the parent's size. What the poll misses is growth in its last interval.
    timed_out = False
    status = None
    peak_rss = None
    interval = 0.005
    try:
        while True:
            pid, status_now, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                status = status_now
                break
            hwm = _vm_hwm(proc.pid)
            if hwm is not None:
                peak_rss = max(peak_rss or 0, hwm)
            if timeout_s is not None and time.perf_counter() - start > timeout_s and not timed_out:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(interval)
            interval = min(interval * 1.5, 0.05)
    except BaseException:
        # Interrupted (Ctrl-C): do not leave a capped child running.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        if group is not None:
            group.cleanup()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # keeps Popen from waiting again
    wall_s = time.perf_counter() - start
    if group is not None:
        for pid in group.pids():  # a descendant still holding the pipes open
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for reader in readers:
        reader.join(timeout=10)
    stdout = b"".join(chunks["stdout"]).decode(errors="replace")
    stderr = b"".join(chunks["stderr"]).decode(errors="replace")

    peak_cgroup = None
    oom_killed = False
    if group is not None:
        peak_cgroup = group.peak()
        kills = group.oom_kills()
        if kills is not None:
            oom_killed = kills > 0
        else:  # older kernels: a SIGKILL we did not send, after the group hit its limit
            oom_killed = proc.returncode == -signal.SIGKILL and not timed_out and group.hit_limit()
        group.cleanup()
    elif rlimit_as is not None:
        oom_killed = proc.returncode != 0 and not timed_out and bool(_ALLOC_FAILURE.search(stderr))
    return LimitedRun(
        returncode=proc.returncode,
        stdout=stdout,
        stderr=stderr,
        peak_rss_bytes=peak_rss,
        oom_killed=oom_killed,
        limit_method=limit_method,
        mem_limit=mem_limit,
        peak_cgroup_bytes=peak_cgroup,
        wall_s=wall_s,
        timed_out=timed_out,
    )
