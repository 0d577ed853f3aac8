"""Sizes in bytes, read from and written for a person: the one parser and the one formatter."""

from __future__ import annotations

import re

UNITS = "BKMGT"  # binary: K is 1024
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse(text: str) -> int:
    """'4G', '512M', '2.5G', '3GiB', '1073741824' -> bytes (binary units); ValueError for anything else."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size")
    number, unit = match.groups()
    return int(float(number) * 1024 ** UNITS.index(unit.upper() or "B"))


def human(size: float) -> str:
    """'512 bytes', '16 MiB', '2.5 GiB': binary units, at most one decimal."""
    value = float(size)
    if abs(value) < 1024:
        return f"{value:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            break
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"
