"""Byte sizes as users write them (``--out-shard-size 5GB``) and as della prints them."""

from __future__ import annotations

import re

from della_cli.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str, option: str = "--out-shard-size") -> int:
    """'5GB' -> 5e9, '500MiB' -> 524288000, '1024' -> 1024 bytes; errors name ``option``."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"{option}: '{text}' is not a size; use e.g. 5GB, 500MB or 2GiB")
    unit = (match.group(2) or "").lower().removesuffix("b")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise UsageError(f"{option}: must be at least 1 byte, got '{text}'")
    return size


def human_size(size: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks and the Hub count)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
