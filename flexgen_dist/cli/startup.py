"""Checks a command makes before it imports torch. An address-space limit (`ulimit -v`) too small
for torch makes its import abort with a C++ `std::bad_alloc` or a MemoryError traceback; a memory
cgroup too small for it gets the process killed by the kernel without a word. Neither says what is
wrong, so both are refused first, in one line (exit 1: the environment, not the user's flags)."""

from __future__ import annotations

import sys

MIN_ADDRESS_SPACE = 1 << 30  # torch + transformers import in ~700 MiB of address space on x86-64 Linux
MIN_START_MEMORY = 320 << 20  # their import's resident set is ~250 MiB


def refuse_too_little_memory() -> None:
    """Exit 1 with one line when RLIMIT_AS or the binding memory cgroup leaves too little to start."""
    problem = _address_space_problem() or _cgroup_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)


def _address_space_problem() -> str | None:
    try:
        import resource
    except ImportError:  # not a POSIX system: no such limit
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and soft < MIN_ADDRESS_SPACE:
        return (f"the address-space limit (ulimit -v) is {soft >> 20} MiB, below the {MIN_ADDRESS_SPACE >> 20} MiB "
                f"torch needs to start; raise it (ulimit -v unlimited) or cap memory with a cgroup instead")
    return None


def _cgroup_problem() -> str | None:
    from ..machine.detect import cgroup_memory

    try:
        group = cgroup_memory()
    except OSError:  # an unreadable /proc or /sys: the planner reports what it can later
        return None
    if group is not None and group.headroom < MIN_START_MEMORY:
        return (f"the memory cgroup {group.group} leaves {group.headroom >> 20} MiB (limit {group.limit >> 20} MiB), "
                f"below the {MIN_START_MEMORY >> 20} MiB torch needs to start; raise the limit")
    return None
