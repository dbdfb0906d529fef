"""Hosts: SLURM host lists ("node[01-04,07],gpu-a[3,5-6]") expanded in pure Python, as
`scontrol show hostnames` does, so finding rank 0's host needs no SLURM command on the node; and
this host's free port and reachable address, for a rendezvous no launcher arranged."""

from __future__ import annotations

import re
import socket

from flexgen_dist.errors import UserError


def expand_nodelist(nodelist: str, *, var: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a SLURM host list, as `scontrol show hostnames` does, in pure Python.

    "node[01-03,07],gpu-a[3,5-6]" -> node01 node02 node03 node07 gpu-a3 gpu-a5 gpu-a6.
    Zero padding is kept ("[098-101]" -> 098 099 100 101); several bracket groups in one name
    expand as a product, the last group varying fastest ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist, var):
        pieces = re.split(r"(\[[^\[\]]*\])", item)  # literal text and [..] groups, alternating
        expanded = [""]
        for piece in pieces:
            if piece.startswith("["):
                choices = _expand_brackets(piece[1:-1], nodelist, var)
            elif "[" in piece or "]" in piece:
                raise UserError(f"{var}={nodelist!r} has unbalanced brackets")
            else:
                choices = [piece]
            expanded = [prefix + choice for prefix in expanded for choice in choices]
        hosts += expanded
    if not hosts:
        raise UserError(f"{var}={nodelist!r} names no host")
    return hosts


def first_host(nodelist: str, *, var: str = "SLURM_JOB_NODELIST") -> str:
    """The first host of a SLURM host list: where rank 0 runs."""
    return expand_nodelist(nodelist, var=var)[0]


def _split_top_level(nodelist: str, var: str) -> list[str]:
    items, depth, current = [], 0, ""
    for char in nodelist.strip():
        if char == "[":
            depth += 1
            if depth > 1:
                raise UserError(f"{var}={nodelist!r} has nested brackets")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"{var}={nodelist!r} has unbalanced brackets")
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    if depth != 0:
        raise UserError(f"{var}={nodelist!r} has unbalanced brackets")
    items.append(current.strip())
    if any(not item for item in items):
        raise UserError(f"{var}={nodelist!r} has an empty host name")
    return items


def _expand_brackets(body: str, nodelist: str, var: str) -> list[str]:
    out: list[str] = []
    for part in body.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise UserError(f"{var}={nodelist!r}: {part!r} in brackets is not a number or a range like 01-04")
        start_text, end_text = match.group(1), match.group(2)
        if end_text is None:
            out.append(start_text)
            continue
        start, end = int(start_text), int(end_text)
        if end < start:
            raise UserError(f"{var}={nodelist!r}: range {part} runs backwards")
        width = len(start_text)  # "01-10" keeps two digits; "8-10" has no padding
        out += [str(number).zfill(width) for number in range(start, end + 1)]
    return out


def free_port() -> int:
    """A TCP port free right now on this host (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _reachable_address() -> str:
    """This host's address as other nodes see it: its name's address unless that is loopback."""
    hostname = socket.gethostname()
    try:
        addr = socket.gethostbyname(hostname)
    except OSError:
        addr = ""
    if addr and not addr.startswith("127."):
        return addr
    try:  # the address of the interface with a route out; connect() on UDP sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))
            addr = sock.getsockname()[0]
        if addr and not addr.startswith(("127.", "0.")):
            return addr
    except OSError:
        pass
    return hostname


# ---- small helpers --------------------------------------------------------------------------------
