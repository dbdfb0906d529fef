"""Temporary names, the one scheme of every file this tool writes (files.py), and whose they are.

`temp_name` makes a fresh one, `temp_pattern` recognizes them, `owner_alive` says whether the
process a name names may still be writing it (so `files.remove_stale_temps` deletes only what a
dead writer left).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket

import psutil

TEMP_TAG = "flexgen-tmp"
NAME_PART_BYTES = 120  # of the target's name inside a temporary name: the whole stays under 255
# Files of another host's processes cannot be checked for a live writer; a write that has not
# touched its file for a day is dead.
FOREIGN_STALE_S = 24 * 3600.0
# A process's start time is known to about a second (psutil derives it from the boot time), so a
# temporary file last written before its pid's start by more than this is a leftover.
_START_SLACK_S = 2.0
_RANDOM_BYTES = 8
_OWNER = rf"\.{re.escape(TEMP_TAG)}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[0-9]+)\.[0-9a-f]{{{2 * _RANDOM_BYTES}}}"


def host_tag() -> str:
    """This host's name as it appears in temporary names (letters, digits and dashes)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _name_part(name: str) -> str:
    raw = os.fsencode(name)
    if len(raw) <= NAME_PART_BYTES:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return os.fsdecode(raw[: NAME_PART_BYTES - 17]) + "~" + digest  # a cut character stays its bytes


def temp_name(name: str) -> str:
    """A fresh temporary name for a file that will become `name` (a name, not a path)."""
    return f".{_name_part(name)}.{TEMP_TAG}.{host_tag()}.{os.getpid()}.{secrets.token_hex(_RANDOM_BYTES)}"


def temp_pattern(name: str | None = None) -> re.Pattern:
    """What `temp_name(name)` gives, as a pattern for `fullmatch`; with no name, the temporary
    names of any file (only for a private folder, where every file is ours)."""
    head = r"\..+" if name is None else r"\." + re.escape(_name_part(name))
    return re.compile(head + _OWNER, re.DOTALL)


def owner_alive(owner_host: str, pid: int, last_write: float, host: str, now: float) -> bool:
    """Whether the writer of a temporary name (its host and pid, the file last written at
    `last_write`) may still be at work, seen from `host` at `now`."""
    if owner_host != host:
        return now - last_write <= FOREIGN_STALE_S
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= last_write + _START_SLACK_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # cannot tell: keep the file
