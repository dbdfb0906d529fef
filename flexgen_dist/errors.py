"""Errors the CLI prints as one line, without a traceback.

- `UserError`: the user can fix it (bad input, a folder they must chmod); exit code 2.
- `EnvironmentFailure`: the machine let the run down (disk full, I/O error); exit code 1.
- `PeerError`: a peer rank of a pipeline died, hung or closed its connection; exit code 1.
- `file_error`: a failed file operation as one of the first two (below).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class UserError(ValueError):
    """Bad input: the message says what is wrong, where, and how to fix it (one line)."""


class SharedError(UserError):
    """A mistake every rank of a pipeline raises alike (one rank's, told to all, or all ranks'):
    rank 0 alone prints it. Any other error is printed by the rank that raised it."""


class NotSupportedYet(UserError):
    """A documented option whose implementation has not landed yet."""


class EnvironmentFailure(RuntimeError):
    """The environment failed the run (disk full, I/O error): one line saying what and where."""


class PeerError(RuntimeError):
    """A peer rank died, hung, or closed its connection."""


def first_line(exc: BaseException) -> str:
    """An exception's message for a one-line error: its first line, at most 200 characters; the
    type's name when the message is empty (`str(exc).splitlines()[0]` raises IndexError then)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


# --- One line for a failed file operation: the user's to fix (exit 2) or the machine's (exit 1).
# 
# `raise file_error(exc, path, "read") from None` turns an `OSError` into the error the CLI prints
# as one line. Who can fix it decides the class: a permission the user can chmod, a path that is
# missing or not a file, a name too long -> `UserError`; a disk that returns EIO, a full disk,
# anything else the operating system reports -> `EnvironmentFailure`.

# errno -> (what happened, what the user should do); the user can fix these themselves.
_USER_ERRNOS = {
    errno.EACCES: ("permission denied", "make it readable (chmod) or run as its owner"),
    errno.EPERM: ("operation not permitted", "make it readable (chmod) or run as its owner"),
    errno.ENOENT: ("no such file", "check the path; restore the file if it was removed"),
    errno.ENOTDIR: ("a part of the path is not a folder", "check the path"),
    errno.EISDIR: ("it is a folder, not a file", "check the path"),
    errno.ENAMETOOLONG: ("the name is too long", "use a shorter path"),
    errno.ELOOP: ("too many symbolic links", "check the links in the path"),
}


def file_error(exc: OSError, path: str | Path, doing: str) -> UserError | EnvironmentFailure:
    """The one-line error for `exc`, raised while doing `doing` ("read", "open") to `path`."""
    code = exc.errno
    if code in _USER_ERRNOS:
        what, fix = _USER_ERRNOS[code]
        return UserError(f"cannot {doing} {str(path)!r}: {what}; {fix}")
    reason = os.strerror(code) if code is not None else str(exc)
    if code == errno.ENOSPC:
        return EnvironmentFailure(
            f"cannot {doing} {str(path)!r}: the disk is full (ENOSPC); free space or point --offload-dir at a bigger disk"
        )
    if code == errno.EIO:
        return EnvironmentFailure(
            f"cannot {doing} {str(path)!r}: I/O error (EIO): the disk or file system failed; "
            "check the system log (dmesg) and copy the files to a healthy disk"
        )
    return EnvironmentFailure(f"cannot {doing} {str(path)!r}: {reason} (errno {code})")
