"""The process shell every command runs its body in: a user's mistake, a failure of the
environment, a signal each end as one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from ..errors import EnvironmentFailure, SharedError, UserError
from ..parallel.comm import PeerError
from .signals import Interrupted
from .streams import SIGPIPE_EXIT, OutputClosed, guarded_stdout


def exit_process(code: int) -> None:
    """End a command's process with `code`. Where a rendezvous left a thread inside c10d's C++
    (parallel/rendezvous.py LEFT_BEHIND), without finalizing the interpreter: finalizing would
    abort the process when that thread returns, after the one-line error, with exit -6."""
    from ..parallel.rendezvous import LEFT_BEHIND

    if LEFT_BEHIND.is_set():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def run_command(main: Callable[[], int], rank_of: Callable[[], int] = lambda: 0) -> int:
    """Run a command's body: a user's mistake becomes one line on stderr and exit code 2 (one
    that every rank raises alike, a `SharedError`, printed by rank 0 only; another by its rank,
    which names itself); a failure of the environment (a dead or hung
    peer, a full disk), one line and exit code 1; SIGINT / SIGTERM (see signals.py), one line
    from rank 0 and 128 + the signal number. Standard output is guarded while it runs
    (streams.py): closed, it is /dev/null; a broken pipe ends the command quietly with 141; a
    failed write is one line and exit 1."""
    try:
        with guarded_stdout():
            return main()
    except OutputClosed:
        return SIGPIPE_EXIT
    except UserError as exc:
        rank = rank_of()
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        elif not isinstance(exc, SharedError):  # this rank's own: the others know only that it left
            print(f"error: rank {rank}: {exc}", file=sys.stderr)
        return 2
    except (PeerError, EnvironmentFailure) as exc:
        logging.getLogger("flexgen_dist").error("%s", exc)
        return 1
    except MemoryError:
        print("error: out of memory (the process's address space or RAM ran out); give it more, or lower "
              "--cpu-mem so the plan offloads more", file=sys.stderr)
        return 1
    except Interrupted as exc:
        if rank_of() == 0:
            print(exc.message, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if rank_of() == 0:
            print("interrupted by SIGINT", file=sys.stderr)
        return 130
