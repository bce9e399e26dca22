"""The shared helpers: sizes, counts and durations (units), text tables, qdesk's folders, the free-space check."""

from __future__ import annotations

from pathlib import Path

import pytest

from converters.core.atomic import check_free_space, free_bytes
from converters.core.errors import OutputError
from converters.core.paths import (
    CACHE_DIR_ENV,
    CONFIG_DIR_ENV,
    DEMO_DIR_ENV,
    MODELS_DIR_ENV,
    RESOURCES_ENV,
    cache_dir,
    config_dir,
    demo_dir,
    logs_dir,
    models_dir,
    resources_dir,
)
from converters.core.units import SizeError, format_count, format_duration, format_gib, format_size, parse_size
from qdesk.display.tables import text_table

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


def test_text_table_aligns_columns_and_drops_trailing_spaces() -> None:
    lines = text_table(("name", "size", "note"), [("a.gguf", "1.5 GB", ""), ("longer.gguf", "12 MB", "ok")],
                       right={1}, rule=True, indent="  ")
    assert lines == ["  name           size  note",
                     "  -----------  ------  ----",
                     "  a.gguf       1.5 GB",
                     "  longer.gguf   12 MB  ok"]
    assert text_table(None, [("x", "1"), ("yy", "22")], right={1}) == ["x    1", "yy  22"]
    assert text_table(None, []) == []


def test_folders_follow_their_overrides_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in (CONFIG_DIR_ENV, CACHE_DIR_ENV, MODELS_DIR_ENV, DEMO_DIR_ENV, RESOURCES_ENV):
        monkeypatch.delenv(variable, raising=False)
    defaults = {"config": config_dir(), "cache": cache_dir(), "models": models_dir()}
    assert defaults["models"].name == "models" and demo_dir() == defaults["cache"] / "demo"
    assert logs_dir() not in defaults.values()
    assert (resources_dir() / "calibration").is_dir()
    assert len(set(defaults.values())) == 3

    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path / "config"))
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(MODELS_DIR_ENV, "~/chosen-models")
    assert config_dir() == tmp_path / "config" and cache_dir() == tmp_path / "cache"
    assert models_dir() == Path.home() / "chosen-models"
    assert demo_dir() == tmp_path / "cache" / "demo"
    assert logs_dir() == tmp_path / "cache" / "logs"
    monkeypatch.setenv(DEMO_DIR_ENV, str(tmp_path / "demo"))
    assert demo_dir() == tmp_path / "demo"


def test_the_free_space_check_names_the_need_and_the_folder(tmp_path: Path) -> None:
    free = free_bytes(tmp_path / "not" / "made" / "yet")  # the nearest existing folder's file system
    assert free is not None and free > 0
    check_free_space(tmp_path / "small.gguf", 1)
    with pytest.raises(OutputError) as refused:
        check_free_space(tmp_path / "huge.gguf", 10**18)
    assert str(refused.value).startswith("Not enough disk space for huge.gguf: it needs about 1000000 TB and ")
    assert str(refused.value).endswith("free; free some space or choose another folder.")
    assert list(tmp_path.iterdir()) == []
