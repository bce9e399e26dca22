"""Sizes as people write and read them."""

from __future__ import annotations

import re

from converters.core.errors import UserError


class SizeError(UserError):
    """A memory size the user typed cannot be read."""



_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


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


def format_size(n: int) -> str:
    """A size for people: "1.2 GB", "300 MB", "12 kB" (powers of 1000, like `qdesk info`)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n} bytes"
