"""Errors the CLI prints as one line, without a traceback.

- `UserError`: the user can fix it (bad input, a folder they must chmod); exit code 2.
- `EnvironmentFailure`: the machine let the run down (disk full, I/O error); exit code 1.
- `PeerError`: a peer rank of a pipeline died, hung or closed its connection; exit code 1.
"""


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
