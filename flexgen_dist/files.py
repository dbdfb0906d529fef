"""Every file this tool writes, written one way: whole or not at all, never through a planted
link, and with every failure of the disk reported.

- A file is written under a temporary name in its own folder, created exclusively (O_EXCL)
  without following links (O_NOFOLLOW), filled with `write_all` (a write of 0 bytes raises, a
  partial one goes on), fsynced, moved onto its name with one `os.replace`, and the folder is
  fsynced so the rename survives a crash. A failure on the way removes the temporary file and
  leaves the old file as it was. `atomic_output` (a path) and `replacing` (a name in a folder
  open as a descriptor) are the two doors to this; `write_atomic` writes bytes at a path.
- Temporary names (temp_names.py) are `.<name>.flexgen-tmp.<host>.<pid>.<16 hex>`: hidden,
  unpredictable, tied to the file they will become (a name over NAME_PART_BYTES is cut and given
  a hash of the whole), and they say which process holds them.
- `remove_stale_temps` deletes only names that fully match that pattern (for one target name,
  regex-escaped, or for any name in a private folder) and whose owner is provably gone: its pid
  is not running on this host, or runs a process that started after the file was last written
  (the pid was reused); on another host, after FOREIGN_STALE_S without a write. A user's own
  `.x.tmp`, another output's temporary file and a live writer's are never touched.

Errors: a full disk (ENOSPC, EDQUOT), an I/O error (EIO) or a write that writes nothing raise
`EnvironmentFailure` (one line: what and where). Any other `OSError` (a missing or read-only
folder, a permission) is raised as it is, for the caller to word with its flag's name. Only EINVAL
from fsync of a folder is ignored: the file system cannot sync folders, and the rename stands.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Iterator

from .errors import EnvironmentFailure, UserError
from .sizes import format_size
from .temp_names import host_tag, owner_alive, temp_name, temp_pattern

FILE_MODE = 0o666  # outputs: the umask takes away what the user does not want
PRIVATE_MODE = 0o600  # files of our private folders
_NAME_TRIES = 8  # fresh random names tried before giving up (only a planted name can collide)
_BUFFER_BYTES = 1 << 20  # what `atomic_output`'s file keeps before it writes
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | O_NOFOLLOW | O_CLOEXEC


# --- writing ------------------------------------------------------------------------------------


def _failure(exc: OSError, path: str | os.PathLike | None) -> EnvironmentFailure | OSError:
    """The disk failed us: an EnvironmentFailure; anything else is the caller's to word."""
    where = f"cannot write {os.fspath(path)!r}" if path is not None else "cannot write"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = f" of {os.fspath(Path(path).absolute().parent)!r}" if path is not None else ""
        return EnvironmentFailure(f"{where}: the disk is full ({exc.strerror}); free space on the disk{folder} "
                                  f"or write somewhere else")
    if exc.errno == errno.EIO:
        return EnvironmentFailure(f"{where}: I/O error (EIO): the disk or file system failed; check the system log "
                                  f"(dmesg) and use a healthy disk")
    return exc


def _nothing_written(path, left: int) -> EnvironmentFailure:
    where = f"cannot write {os.fspath(path)!r}" if path is not None else "cannot write"
    return EnvironmentFailure(f"{where}: write() wrote 0 of the {left} bytes left; the disk or file system failed")


def write_all(fd: int, data, path: str | os.PathLike | None = None) -> None:
    """Write all of `data` to `fd`. A partial write (a signal, a pipe) goes on from where it
    stopped; a write of 0 bytes raises (it would repeat forever). `path` is for messages."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            n = os.write(fd, view[done:])
        except OSError as exc:
            raise _failure(exc, path) from None
        if n <= 0:
            raise _nothing_written(path, len(view) - done)
        done += n


def pwrite_all(fd: int, data, offset: int, path: str | os.PathLike | None = None) -> None:
    """`write_all` at a file offset (os.pwrite): the file position is not used."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            n = os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise _failure(exc, path) from None
        if n <= 0:
            raise _nothing_written(path, len(view) - done)
        done += n


def fsync_file(fd: int, path: str | os.PathLike | None = None) -> None:
    """Put the file's bytes on the disk; a failure raises (the file may not be there after a crash)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _failure(exc, path) from None


def fsync_folder(folder: str | os.PathLike | int, path: str | os.PathLike | None = None) -> None:
    """Make a rename or unlink in `folder` (a path, or an open descriptor whose path is `path`,
    for messages) survive a crash. Only EINVAL (a file system that cannot sync a folder) is
    ignored; any other failure raises."""
    own = not isinstance(folder, int)
    fd = open_folder(folder) if own else folder
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise _failure(exc, folder if own else path) from None
    finally:
        if own:
            os.close(fd)


def open_folder(path: str | os.PathLike) -> int:
    """A descriptor of the folder `path`, for writing inside it by name (`dir_fd`)."""
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | O_CLOEXEC)


def create_temp(dir_fd: int, name: str, *, where: Path, mode: int) -> tuple[str, int]:
    """(temporary name, open descriptor) of a new empty file that will become `name`."""
    for _ in range(_NAME_TRIES):
        tmp = temp_name(name)
        try:
            return tmp, os.open(tmp, _CREATE_FLAGS, mode, dir_fd=dir_fd)
        except FileExistsError:
            continue  # something sits at that name (a planted link?): never write through it
        except OSError as exc:
            raise _failure(exc, where / name) from None
    raise EnvironmentFailure(f"cannot create a temporary file in {str(where)!r}: {_NAME_TRIES} fresh random names "
                             f"were all taken")


@contextlib.contextmanager
def replacing(dir_fd: int, name: str, *, where: Path, mode: int = PRIVATE_MODE) -> Iterator[int]:
    """Yield the descriptor of a fresh temporary file in the folder open as `dir_fd` (whose path
    is `where`, for messages); when the block ends normally, the file is fsynced, closed, renamed
    onto `name` and the folder fsynced. An exception removes the temporary file; one raised by
    the block itself is passed on as it is."""
    target = where / name
    tmp, fd = create_temp(dir_fd, name, where=where, mode=mode)
    try:
        try:
            yield fd
            fsync_file(fd, target)
        finally:
            try:
                os.close(fd)  # NFS may report a full disk only here
            except OSError as exc:
                raise _failure(exc, target) from None
        try:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            raise _failure(exc, target) from None
    except BaseException:
        unlink_quietly(dir_fd, tmp)
        raise
    fsync_folder(dir_fd, where)


class AtomicFile:
    """The binary file `atomic_output` yields: `write` keeps up to 1 MiB, then writes it whole."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd, self._path, self._buffer = fd, path, bytearray()

    def write(self, data) -> int:
        self._buffer += data
        if len(self._buffer) >= _BUFFER_BYTES:
            self.flush()
        return len(data)

    def flush(self) -> None:
        data, self._buffer = self._buffer, bytearray()
        write_all(self._fd, data, self._path)

    def fileno(self) -> int:
        return self._fd


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, mode: int = FILE_MODE) -> Iterator[AtomicFile]:
    """Write `path` whole or not at all: the old file (if any) stays intact until the new one is
    complete and on disk. Dead writers' temporary files of this same name are removed first."""
    path = Path(path)
    folder = path.absolute().parent
    dir_fd = open_folder(folder)
    try:
        remove_stale_temps(dir_fd, path.name)
        with replacing(dir_fd, path.name, where=folder, mode=mode) as fd:
            f = AtomicFile(fd, folder / path.name)
            yield f
            f.flush()
    finally:
        os.close(dir_fd)


def write_atomic(path: str | os.PathLike, data: bytes, *, mode: int = FILE_MODE) -> None:
    """`data` as the file `path`, whole or not at all (see `atomic_output`)."""
    with atomic_output(path, mode=mode) as f:
        f.write(data)


def write_json_file(path: str | os.PathLike, data: object, *, flag: str, indent: int | None = 1) -> None:
    """`data` as JSON at `path`, whole or not at all; a failing disk is an `EnvironmentFailure`
    naming `flag`, the option that gave the path."""
    try:
        write_atomic(path, (json.dumps(data, indent=indent, default=str) + "\n").encode())
    except OSError as exc:
        raise EnvironmentFailure(f"cannot write {flag} {os.fspath(path)!r}: {exc.strerror or exc}; free space "
                                 f"or choose another {flag} path") from None


def describe_kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_nofollow(path: str | os.PathLike, flags: int) -> int:
    """os.open that never follows a link planted at `path` and only accepts a regular file
    (for files written in place, such as a progress file that is appended to)."""
    try:
        fd = os.open(path, flags | O_NOFOLLOW | O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        if os.path.islink(path):
            raise UserError(f"{str(path)!r} is a symbolic link; refusing to follow it (remove it and rerun)") from None
        raise exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UserError(f"{str(path)!r} is {describe_kind(mode)}, not a regular file; remove it or choose another --output")
    return fd


# --- cleaning -----------------------------------------------------------------------------------


def remove_stale_temps(folder: str | os.PathLike | int, name: str | None = None, *, folders: bool = False) -> list[str]:
    """Delete the temporary files in `folder` (a path or an open descriptor) of writers that are
    gone; returns their names. With `name`, only those of the file `name`; without, those of
    any file (for a private folder only). A link under such a name is unlinked (its target is
    never touched); a folder only with `folders=True` (with its content); anything else is kept."""
    own = not isinstance(folder, int)
    dir_fd = open_folder(folder) if own else folder
    try:
        pattern, host, now, removed = temp_pattern(name), host_tag(), time.time(), []
        for entry in os.listdir(dir_fd):
            match = pattern.fullmatch(entry)
            if match is None:
                continue
            try:
                st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # its writer renamed it meanwhile
            if owner_alive(match["host"], int(match["pid"]), st.st_mtime, host, now):
                continue
            try:
                if stat.S_ISDIR(st.st_mode):
                    if folders:
                        shutil.rmtree(entry, dir_fd=dir_fd)
                        removed.append(entry)
                elif (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)) and unlink_quietly(dir_fd, entry):
                    removed.append(entry)
            except OSError:
                continue  # not ours to remove after all (another user's, in a shared folder): keep it
        return removed
    finally:
        if own:
            os.close(dir_fd)


def unlink_quietly(dir_fd: int | None, name: str) -> bool:
    """Remove `name` (of the folder open as `dir_fd`); False when it was not there."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


# --- checks of the offload folder ---------------------------------------------------------------


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
    probe = path / temp_name("write-probe")
    try:  # a probe, not os.access: it also catches read-only mounts, and root passes os.access anyway
        os.close(os.open(probe, _CREATE_FLAGS, PRIVATE_MODE))
    except OSError as exc:
        raise UserError(f"--offload-dir {path} is not writable ({exc.strerror}); choose a folder you can write") from None
    unlink_quietly(None, str(probe))


def check_offload_space(offload_dir: str | Path, planned_bytes: int) -> None:
    """Refuse, before any work, an offload folder this run cannot fill: raises `UserError` when
    `offload_dir` is not a usable folder (`check_offload_folder`; it is created if missing) or has
    fewer than `planned_bytes` bytes free (what the run will still write there, not what is
    already there)."""
    path = Path(offload_dir)
    check_offload_folder(path)
    vfs = os.statvfs(path)
    free = vfs.f_bavail * vfs.f_frsize
    if free < planned_bytes:
        raise UserError(
            f"--offload-dir {path} has {format_size(free)} free but this run writes {format_size(planned_bytes)} there "
            f"({free} < {planned_bytes} bytes); free space, point --offload-dir at a bigger disk, or put less on disk"
        )
