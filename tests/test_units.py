"""Sizes, counts and durations as people read and write them (converters.core.units)."""

from __future__ import annotations

import pytest

from converters.core.units import SizeError, format_count, format_duration, format_gib, format_size, parse_size

MiB = 2**20


def test_sizes() -> None:
    assert parse_size("8GB") == 8 * 10**9
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size(" 512 mib ") == 512 * MiB
    assert parse_size("8G") == 8 * 2**30
    assert parse_size("1000") == 1000
    for bad in ("", "lots", "8XB", "-1GB", "1.2.3GB"):
        with pytest.raises(SizeError, match="is not a memory size"):
            parse_size(bad)
    assert format_size(295_347_456) == "295 MB" and format_size(1_500_000_000) == "1.5 GB"


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 bytes"), (999, "999 bytes"), (1000, "1.0 kB"), (12_340, "12.3 kB"), (1_000_000, "1.0 MB"),
    (99_940_000, "99.9 MB"), (99_960_000, "100 MB"), (270_885_632, "271 MB"), (4.2e12, "4.2 TB"),
])
def test_format_size(size: float, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize(("count", "text"), [
    (812, "812"), (1500, "1.5K"), (134_515_008, "135M"), (7_241_732_096, "7.2B"), (7_000_000_000, "7B"),
    (12_000_000, "12M"),
])
def test_format_count(count: int, text: str) -> None:
    assert format_count(count) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 s"), (4.4, "4 s"), (59.6, "1 min 00 s"), (185, "3 min 05 s"), (3720, "1 h 02 min"), (-3, "0 s"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_gib() -> None:
    assert format_gib(70 * 2**30) == "70.0" and format_gib(3 * 2**29) == "1.5"
