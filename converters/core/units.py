"""Sizes, counts and durations as people write and read them: the one place qdesk formats or reads them.

It sits in `converters/core` because every layer above `native` reports sizes (the converter's disk-space
sentences, the CLI's tables, the desktop app); `native` reports facts and leaves their wording to the layers above.
Sizes are in powers of 1000 ("1.2 GB"), as file managers and the Hub show them; `format_gib` is for device memory,
which drivers report in powers of 1024.
"""

from __future__ import annotations

import re

from converters.core.errors import UserError

__all__ = ["GIB", "SizeError", "format_count", "format_duration", "format_gib", "format_size", "parse_size"]

GIB = 1 << 30


class SizeError(UserError):
    """A memory size the user typed cannot be read."""


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_DECIMAL_SIZES = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
_DECIMAL_COUNTS = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))


def parse_size(text: str, *, option: str | None = None) -> int:
    """Bytes in a size such as "8GB" (10^9), "1.5GiB" (2^30), "512MiB", "8G" (GiB) or "1000000" (bytes).

    Raises SizeError (one sentence, naming `option` when given) for anything else.
    """
    match = _SIZE_PATTERN.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        what = f"{option} {text!r}" if option else repr(text)
        raise SizeError(f"{what} is not a memory size; write it like 8GB, 1.5GiB or 512MB.")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _three_digits(value: float) -> str:
    """One decimal below 100, none from 100: "1.5", "12.3", "295"."""
    return f"{value:.1f}" if value < 99.95 else f"{value:.0f}"


def format_size(n: float) -> str:
    """A size in bytes for people: "1.5 GB", "295 MB", "12.0 kB", "512 bytes" (powers of 1000)."""
    for unit, scale in _DECIMAL_SIZES:
        if n >= scale:
            return f"{_three_digits(n / scale)} {unit}"
    return f"{n:.0f} bytes"


def format_count(n: int) -> str:
    """A large count such as a parameter count: "135M", "7.2B", "1.5K", "812"."""
    for unit, scale in _DECIMAL_COUNTS:
        if n >= scale:
            return _three_digits(n / scale).removesuffix(".0") + unit
    return f"{n}"


def format_gib(n: float) -> str:
    """Device memory in GiB with one decimal, without the unit (for a column or a sentence that names it): "70.0"."""
    return f"{n / GIB:.1f}"


def format_duration(seconds: float | None) -> str:
    """"1 h 02 min", "3 min 05 s", "12 s" (rounded to the second); "" when unknown (None)."""
    if seconds is None:
        return ""
    whole = max(0, round(seconds))
    if whole >= 3600:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    if whole >= 60:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole} s"
