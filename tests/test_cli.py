"""The command-line contract: help, usage errors, the desktop app starting, and the demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def qdesk(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qdesk", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_help_lists_every_contract_command() -> None:
    result = qdesk("--help")
    assert result.returncode == 0
    for command in ("gui", "convert", "calibrate", "quantize", "eval", "chat", "compare", "info", "models",
                    "download", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["convert", "info"])
def test_command_help(command: str) -> None:
    result = qdesk(command, "--help")
    assert result.returncode == 0
    assert "usage: qdesk" in result.stdout


def test_bad_usage_exits_2() -> None:
    assert qdesk("convert").returncode == 2
    assert qdesk("convert", "x", "--outtype", "q4_k").returncode == 2
    assert qdesk("no-such-command").returncode == 2


def test_gui_opens_and_closes_offscreen(tmp_path: Path) -> None:
    result = qdesk("gui", "--quit-after", "1", env={"QT_QPA_PLATFORM": "offscreen",
                                                    "QDESK_CONFIG_DIR": str(tmp_path / "config"),
                                                    "QDESK_MODELS_DIR": str(tmp_path / "models")}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "config" / "window.ini").is_file()


def test_gui_without_a_display_says_so_in_one_sentence() -> None:
    env = {name: "" for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    result = qdesk("gui", env=env)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "no display" in result.stderr


def test_debug_shows_the_traceback() -> None:
    assert "Traceback" in qdesk("--debug", "info", "/nonexistent.gguf").stderr
    assert "Traceback" not in qdesk("info", "/nonexistent.gguf").stderr


@pytest.mark.slow
def test_demo_runs_the_whole_flow_on_the_starter_model(test_cache: Path) -> None:
    result = qdesk("demo", timeout=600, env={"QDESK_DEMO_DIR": str(test_cache / "demo")})
    assert result.returncode == 0, result.stderr
    assert "135M parameters" in result.stdout
    for variant in ("F16", "Q8_0", "Q4_K_M", "Q2_K"):
        assert (test_cache / "demo" / f"SmolLM2-135M-Instruct-{variant}.gguf").is_file()
        assert f"\n{variant}" in result.stdout or f" {variant}:" in result.stdout
    assert "Paris" in result.stdout.split("Q: What is the capital of France?")[1]
