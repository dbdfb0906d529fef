"""Where results go: checks on `--output` (and the other files a run writes) before any work.

`check_output_path` refuses a folder, a device, a FIFO, a socket or a symbolic link at the
output path (or at the progress files beside it), a missing or read-only folder, and the input
file itself. `-` is standard output and is always accepted. The files themselves are written by
`flexgen_dist.files` (whole or not at all, never through a link).
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from pathlib import Path

from ..errors import UserError
from ..files import describe_kind

STDOUT = "-"


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
    for candidate in (target, *(Path(c) for c in companions)):
        why = _cannot_replace(candidate, parent)
        if why:
            what = "" if candidate == target else f": the progress file {str(candidate)!r}"
            raise UserError(f"cannot write {flag} {text!r}{what}: {why}")
    if input_path is not None and target.exists():
        with contextlib.suppress(OSError):
            if os.path.samefile(target, input_path):
                raise UserError(f"{flag} {text!r} is the input file; choose another output file")


_FS_IOC_GETFLAGS = 0x80086601  # Linux: the inode flags that chattr sets
_IMMUTABLE, _APPEND_ONLY = 0x10, 0x20


def _cannot_replace(path: Path, parent: Path) -> str | None:
    """Why the run could not replace an existing file at `path` (files.atomic_output renames a
    new file over it at the end, after all the work), or None. Permission bits do not matter
    for a rename; an immutable or append-only file, and another user's file in a sticky folder
    (such as /tmp), cannot be replaced, even by root for the first."""
    try:
        st = os.lstat(path)
    except OSError:
        return None  # absent: created, which the folder check covers
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except (ImportError, OSError):
        fd = None
    if fd is not None:
        try:
            flags = struct.unpack("l", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
        except OSError:  # a file system without inode flags
            flags = 0
        finally:
            os.close(fd)
        if flags & (_IMMUTABLE | _APPEND_ONLY):
            kind = "immutable" if flags & _IMMUTABLE else "append-only"
            return (f"{str(path)!r} is {kind} (chattr +{'i' if flags & _IMMUTABLE else 'a'}), so it cannot be "
                    f"replaced; clear that with chattr -{'i' if flags & _IMMUTABLE else 'a'}, or choose another file")
    euid = os.geteuid() if hasattr(os, "geteuid") else 0
    folder = os.stat(parent)
    if folder.st_mode & stat.S_ISVTX and euid not in (0, st.st_uid, folder.st_uid):
        return (f"{str(path)!r} belongs to another user in a sticky folder ({str(parent)!r}), so it cannot be "
                f"replaced; choose another file")
    return None
