"""Memory sizes as people write them: 4G, 512MiB, 1.5G, 4GB, 1048576."""

from __future__ import annotations

import re

from .errors import UserError

# Bare K/M/G/T mean powers of 1024, as `docker -m 4G` and cgroup files read them; KB/MB/GB/TB
# mean powers of 1000, as Accelerate's `max_memory` reads them.
_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, flag: str = "memory size") -> int:
    """Bytes of a size. Case-insensitive; raises `UserError` naming `flag` on anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise UserError(f"{flag} {text} is negative; give a size like 4G, 512MiB or 1000000")
        return text
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise UserError(
            f"{flag} {text!r} is not a size; give a number with an optional unit K/M/G/T (powers of "
            "1024), KiB/MiB/GiB/TiB, or KB/MB/GB/TB (powers of 1000), e.g. 4G"
        )
    scale = _UNITS[unit]
    if scale == 1 and not float(match.group(1)).is_integer():
        raise UserError(f"{flag} {text!r} has a fraction of a byte; give whole bytes or a unit")
    return int(float(match.group(1)) * scale)


def format_size(num_bytes: float | None) -> str:
    """'3.73 GiB'-style text of a byte count; '-' for None."""
    if num_bytes is None:
        return "-"
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"  # unreachable
