"""Checks a command makes before it imports torch. An address-space limit (`ulimit -v`) too small
for torch makes its import abort with a C++ `std::bad_alloc` or a MemoryError traceback; a memory
cgroup too small for it gets the process killed by the kernel without a word. Neither says what is
wrong, so both are refused first, in one line (exit 1: the environment, not the user's flags)."""

from __future__ import annotations

import sys

MIN_ADDRESS_SPACE = 1 << 30  # torch + transformers import in ~700 MiB of address space on x86-64 Linux
MIN_START_MEMORY = 320 << 20  # their import's resident set is ~250 MiB


MMAP_THRESHOLD = 4 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def bounded_heap() -> None:
    """Buffers of 4 MiB and more come from mmap and go back to the system when freed. glibc's
    default threshold rises to 32 MiB as such buffers are freed, after which the heap of a process
    that allocates and frees layer-sized temporaries fragments and keeps what the plan counted as
    freed (measured: the default run's peak 8% over its plan; Accelerate under a 4 GiB cap, 5 GiB of
    heap for 2 GiB of live data). The planner's peak is only a promise with this. Not glibc: no-op."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


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
    from ..planning.detect import cgroup_memory

    try:
        group = cgroup_memory()
    except OSError:  # an unreadable /proc or /sys: the planner reports what it can later
        return None
    if group is not None and group.headroom < MIN_START_MEMORY:
        return (f"the memory cgroup {group.group} leaves {group.headroom >> 20} MiB (limit {group.limit >> 20} MiB), "
                f"below the {MIN_START_MEMORY >> 20} MiB torch needs to start; raise the limit")
    return None
