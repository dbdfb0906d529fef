"""Files written so that a crash, a full disk or a planted link never leaves one that looks finished.

Every file is written under a fresh temporary name in the same folder, created exclusively
(O_EXCL) without following links (O_NOFOLLOW), so nobody can make us write through a name they
placed there. Every write's returned count is checked (short writes are continued), the bytes are
hashed while they are written, the file is fsynced, renamed onto its final name only when
complete, and the folder is fsynced so the rename survives a crash. A failure on the way removes
the temporary file and raises `EnvironmentFailure`: nothing torn, nothing left behind.

Temporary names are `tmp.<host>.<pid>.<random>`: unpredictable, and they say who holds them, so
`remove_leftovers` can delete those of processes that died (a killed run, a crashed node)
without touching those of ranks that are writing right now.

All paths inside a folder are relative to an open descriptor of that folder (`dir_fd`), so the
folder cannot be swapped for another one between our check of it and our writes.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..errors import EnvironmentFailure, UserError
from ..planning.sizes import format_size
from .piece_hash import PieceHasher, hashing_pool, pieces

TEMP_PREFIX = "tmp."
_CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME_TRIES = 8  # fresh random names tried before giving up (only a planted name can collide)
# A writer's process start time is known to about a second (psutil derives it from the boot time),
# so a temporary file whose last write is older than its pid's start by more than this is a leftover.
_START_SLACK_S = 2.0
# Files of another host's processes cannot be checked for a live writer; a write that has not
# touched its file for a day is dead.
FOREIGN_STALE_S = 24 * 3600.0
_TEMP_NAME = re.compile(r"tmp\.([A-Za-z0-9-]+)\.([0-9]+)\.[0-9a-f]+")


@dataclass(frozen=True)
class WrittenFile:
    """What `write_file` wrote: enough to trust the file later without reading it again."""

    size: int
    digest: str  # `piece_hash` digest of the bytes, computed while writing them
    mtime_ns: int  # of the inode we wrote (a rename keeps it)


def host_tag() -> str:
    """This host's name as it appears in temporary names (letters, digits and dashes)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def temp_name() -> str:
    return f"{TEMP_PREFIX}{host_tag()}.{os.getpid()}.{secrets.token_hex(8)}"


def write_file(dir_fd: int, name: str, data: memoryview, where: Path) -> WrittenFile:
    """Write `data` as file `name` of the folder open as `dir_fd` (whose path is `where`, for
    messages): whole or not at all. Raises `EnvironmentFailure` when the disk fails us (full,
    quota, I/O error); the temporary file is removed and `name` is left as it was."""
    tmp, fd = _create_temp(dir_fd, where)
    try:
        try:
            digest = _write_hashed(fd, data)
            os.fsync(fd)
            mtime_ns = os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)  # NFS may report a full disk only here
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        unlink_quietly(dir_fd, tmp)
        if isinstance(exc, OSError):
            raise _failure(exc, where / name, len(data)) from None
        raise
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a file system that cannot fsync a folder: the rename stands
            raise _failure(exc, where / name, len(data)) from None
    return WrittenFile(size=len(data), digest=digest, mtime_ns=mtime_ns)


def remove_leftovers(dir_fd: int) -> list[str]:
    """Delete the temporary files of writers that are gone; returns their names.

    A file of this host is a leftover when its pid is not running, or runs a process that started
    after the file was last written (the pid was reused). A file of another host is a leftover
    after FOREIGN_STALE_S without a write. Anything but a plain file under a temporary name (a
    planted link) is removed too; unlinking a link never touches its target."""
    host, now, removed = host_tag(), time.time(), []
    for name in os.listdir(dir_fd):
        match = _TEMP_NAME.fullmatch(name)
        if match is None:
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # its writer renamed it meanwhile
        if not stat.S_ISREG(st.st_mode):
            leftover = True
        elif match.group(1) == host:
            leftover = not _holder_alive(int(match.group(2)), st.st_mtime)
        else:
            leftover = now - st.st_mtime > FOREIGN_STALE_S
        if leftover and unlink_quietly(dir_fd, name):
            removed.append(name)
    return removed


def check_offload_folder(offload_dir: str | Path, *, create: bool = True) -> None:
    """Refuse, before any work, an offload folder that cannot be used: raises `UserError` when
    `offload_dir` is not a folder, is missing (`create=False`) or cannot be created, or cannot be
    written."""
    path = Path(offload_dir)
    if path.exists() and not path.is_dir():
        created = " (it is created if missing)" if create else ""
        raise UserError(f"--offload-dir {path} is not a folder; give a folder{created}")
    if not create and not path.exists():
        raise UserError(f"--offload-dir {path} does not exist; create it or give an existing folder")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UserError(f"--offload-dir {path} cannot be created ({exc.strerror}); create it or choose another folder") from None
    probe = path / temp_name()
    try:  # a probe, not os.access: it also catches read-only mounts, and root passes os.access anyway
        os.close(os.open(probe, _CREATE_FLAGS, 0o600))
    except OSError as exc:
        raise UserError(f"--offload-dir {path} is not writable ({exc.strerror}); choose a folder you can write") from None
    unlink_quietly(None, str(probe))


def check_offload_space(offload_dir: str | Path, planned_bytes: int) -> None:
    """Refuse, before any work, an offload folder this run cannot fill: raises `UserError` when
    `offload_dir` is not a usable folder (`check_offload_folder`; it is created if missing) or has
    fewer than `planned_bytes` bytes free (what the run will still write there, not what is
    already there).
    """
    path = Path(offload_dir)
    check_offload_folder(path)
    vfs = os.statvfs(path)
    free = vfs.f_bavail * vfs.f_frsize
    if free < planned_bytes:
        raise UserError(
            f"--offload-dir {path} has {format_size(free)} free but this run writes {format_size(planned_bytes)} there "
            f"({free} < {planned_bytes} bytes); free space, point --offload-dir at a bigger disk, or put less on disk"
        )


def _create_temp(dir_fd: int, where: Path) -> tuple[str, int]:
    for _ in range(_NAME_TRIES):
        name = temp_name()
        try:
            return name, os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue  # something sits at that name (a planted link?): never write through it
        except OSError as exc:
            raise _failure(exc, where / name, 0) from None
    raise EnvironmentFailure(f"cannot create a temporary file in {where}: {_NAME_TRIES} fresh random names were all taken")


def _write_hashed(fd: int, data: memoryview) -> str:
    """Write all of `data` to `fd`, returning its digest: each piece is hashed on other threads
    while it is written (both release the GIL), so hashing costs no wall time on a machine with
    cores to spare."""
    parts = pieces(data)
    with hashing_pool(len(parts)) as pool:
        hasher = PieceHasher(pool)
        for piece in parts:
            hasher.add(piece)
            _write_all(fd, piece)
        return hasher.hexdigest()


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        n = os.write(fd, data[done:])  # may write fewer bytes than asked: go on from there
        if n <= 0:
            raise OSError(errno.EIO, "write() wrote nothing")
        done += n


def _holder_alive(pid: int, last_write: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= last_write + _START_SLACK_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # cannot tell: keep the file


def unlink_quietly(dir_fd: int | None, name: str) -> bool:
    """Remove `name` (of the folder open as `dir_fd`); False when it was not there."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def _failure(exc: OSError, path: Path, nbytes: int) -> EnvironmentFailure:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EnvironmentFailure(
            f"disk full: writing {path} ({format_size(nbytes)}) failed ({exc.strerror}); "
            f"free space on the disk of {path.parent} or point --offload-dir at a bigger one"
        )
    return EnvironmentFailure(f"writing {path} failed ({exc.strerror or exc})")
