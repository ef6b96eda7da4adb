"""Byte sizes: parsing `24GiB` / `80GB` / plain integers, and formatting for people.

Binary units (KiB, MiB, GiB, TiB) are powers of 1024; decimal units (KB, MB, GB, TB) are
powers of 1000, as on a GPU's data sheet ("80GB") versus what NVML reports (79.19 GiB).
"""

from __future__ import annotations

import math
import re

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_UNITS = {
    "": 1,
    "b": 1,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": TiB,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")

VALID_SIZE_HINT = "a byte size such as 24GiB, 512MiB, 80GB or a plain number of bytes"


def parse_size(value: int | str) -> int:
    """Return a byte count from an int or a string like ``24GiB``; raise ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected {VALID_SIZE_HINT}, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected {VALID_SIZE_HINT}, got {type(value).__name__}")
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"expected {VALID_SIZE_HINT}, got {value!r}")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"unknown size unit {unit!r} in {value!r}; "
            "use one of KiB, MiB, GiB, TiB, KB, MB, GB, TB"
        )
    return round(float(number) * factor)


def format_size(n_bytes: int | float, *, precision: int = 1) -> str:
    """Format bytes in binary units, e.g. ``format_size(25769803776) == '24.0 GiB'``."""
    sign = "-" if n_bytes < 0 else ""
    n = abs(n_bytes)
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= factor:
            return f"{sign}{n / factor:.{precision}f} {unit}"
    return f"{sign}{int(n)} B"


def gib(n_bytes: int | float) -> float:
    return n_bytes / GiB


def ceil_to(value: float, step: float) -> float:
    """Round ``value`` up to a multiple of ``step`` (stable against float noise)."""
    scaled = value / step
    return round(math.ceil(round(scaled, 9)) * step, 10)


def floor_to(value: float, step: float) -> float:
    scaled = value / step
    return round(math.floor(round(scaled, 9)) * step, 10)


def format_gib(n_bytes: int | float) -> str:
    """Bytes as GiB with two decimals, e.g. ``format_gib(1.5 * GiB) == '1.50 GiB'``: the unit
    and precision of vLLM's own memory lines, so a message can be compared with its log."""
    return f"{float(n_bytes) / GiB:.2f} GiB"
