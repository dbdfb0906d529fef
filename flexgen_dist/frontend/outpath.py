"""Where results go, safely: checks on `--output` before any work, and files written so that a
crash never leaves a half-written output or damages a file the user did not ask us to replace.

Contract:
- `check_output_path` refuses a folder, a device, a FIFO, a socket or a symbolic link at the
  output path (or at the progress files beside it), a missing or read-only folder, and the input
  file itself. `-` is standard output and is always accepted.
- Files are created with mode 0o666 filtered by the umask (as `open(path, "w")` would do), never
  through a symbolic link (O_NOFOLLOW), and a new output appears whole or not at all
  (`atomic_output`: temporary file in the same folder, fsync, rename, fsync of the folder).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import UserError

STDOUT = "-"
# O_NOFOLLOW is POSIX; where it is missing (Windows) lstat checks are all we have.
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
FILE_MODE = 0o666  # the umask takes away what the user does not want


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


def check_output_path(path: str | os.PathLike, *, input_path: str | os.PathLike | None = None,
                      companions: tuple[str, ...] = (), flag: str = "--output", allow_stdout: bool = True) -> None:
    """Fail before the job runs, not after hours of work, and never write over something that is
    not a plain file. `companions` are further files the run will create next to the output (its
    progress files); they get the same checks. `allow_stdout=False`: a file it must be (`-` is
    refused), e.g. a trace beside results that go to standard output."""
    text = os.fspath(path)
    or_stdout = ", or - for standard output" if allow_stdout else ""
    if text == STDOUT:
        if allow_stdout:
            return
        raise UserError(f"{flag} -: standard output is not possible here; give a file name")
    if not text:
        raise UserError(f"{flag} is empty; give a file name{or_stdout}")
    if text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        raise UserError(f"{flag} {text!r} names a folder; give a file name inside it, e.g. {text}results.jsonl")
    target = Path(text)
    for candidate in (target, *(Path(c) for c in companions)):
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            what = "" if candidate == target else f": the progress file {str(candidate)!r}"
            raise UserError(
                f"{flag} {text!r}{what} is {describe_kind(mode)}; refusing to write there: "
                f"give the path of a regular file{or_stdout}"
            )
    parent = target.absolute().parent
    if not parent.is_dir():
        raise UserError(f"cannot write {flag} {text!r}: folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {flag} {text!r}: folder {str(parent)!r} is not writable; choose another folder")
    if input_path is not None and target.exists():
        with contextlib.suppress(OSError):
            if os.path.samefile(target, input_path):
                raise UserError(f"{flag} {text!r} is the input file; choose another output file")


def open_nofollow(path: str | os.PathLike, flags: int) -> int:
    """os.open that never follows a link planted at `path` and only accepts a regular file."""
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


def write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (signals, pipes, near-full disks): loop until done."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_folder(path: str | os.PathLike) -> None:
    """Make a rename or unlink in this folder durable (not possible on every platform)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_name(path: Path) -> Path:
    """Hidden, unique, in the same folder (rename is atomic only within one file system)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temps(path: Path) -> None:
    """Temporary files of an earlier run of this output that was killed while writing it."""
    for stale in path.absolute().parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(stale).st_mode):
                stale.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write `path` whole or not at all: the old file (if any) stays intact until the new one is
    complete and on disk. Yields a binary file; a raised exception removes the temporary file."""
    path = Path(path)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.absolute().parent)
