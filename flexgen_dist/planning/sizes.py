"""Memory sizes as people write them: 4G, 512MiB, 1.5GB, 1000000."""

from __future__ import annotations

import re

from ..errors import UserError

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str, flag: str = "size") -> int:
    """Bytes in `text`; K/M/G/T (and KiB/KB/...) are powers of 1024."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"{flag} {text!r} is not a size; write e.g. 4G, 512M or 1073741824")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * _UNITS[unit])


def format_size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"
