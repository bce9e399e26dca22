"""The desktop app where Qt's platform is missing: one sentence and exit status 1 instead of Qt's abort (134)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qdesk.gui.platform_check import XCB_PACKAGES, missing_clause, missing_libraries, platform_problem, xcb_plugin
from tests.cli_support import REPO_ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Qt's xcb platform is Linux's")
ABSENT_DISPLAY = ":93"


@pytest.fixture(scope="module")
def complete_plugin() -> Path:
    """A Qt platform plugin whose libraries are all installed here (the minimal one), standing in for xcb."""
    plugin = xcb_plugin()
    assert plugin is not None
    minimal = plugin.with_name("libqminimal.so")
    assert missing_libraries(minimal) == []
    return minimal


@pytest.fixture(scope="module")
def plugin_missing_a_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared object linked against a library that is then removed, as libqxcb.so is on a bare system."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a plugin with a missing library")
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "absent.c").write_text("int qdesk_absent(void) { return 1; }\n")
    (folder / "plugin.c").write_text("int qdesk_absent(void);\nint qdesk_plugin(void) { return qdesk_absent(); }\n")
    library = folder / "libqdesk-test-absent.so.1"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", library, folder / "absent.c",
                    "-Wl,-soname,libqdesk-test-absent.so.1"], check=True)
    plugin = folder / "libqfake.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", plugin, folder / "plugin.c", library], check=True)
    library.unlink()
    return plugin


def _environment(**values: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM", "XDG_SESSION_TYPE")}
    return {**environment, **values}


def test_the_app_says_why_it_cannot_open_instead_of_aborting() -> None:
    """On this machine either the xcb libraries are missing or no X server answers on :93; both are one sentence."""
    done = subprocess.run([sys.executable, "-m", "qdesk", "gui", "--quit-after", "1"], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT, env=_environment(DISPLAY=ABSENT_DISPLAY))
    assert done.returncode == 1, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qdesk: The desktop window cannot open: "), done.stderr
    assert "Traceback" not in done.stderr
    missing = missing_libraries(xcb_plugin())
    if missing:
        assert all(name in lines[0] for name in missing) and "sudo apt install" in lines[0]
        assert "sudo dnf install" in lines[0]
    else:
        assert f"no X server answers on DISPLAY={ABSENT_DISPLAY}" in lines[0]


def test_missing_libraries_are_named_with_their_packages(plugin_missing_a_library: Path) -> None:
    assert missing_libraries(plugin_missing_a_library) == ["libqdesk-test-absent.so.1"]
    sentence = platform_problem({"DISPLAY": ":0"}, plugin_missing_a_library)
    assert sentence is not None and "libqdesk-test-absent.so.1, which is not installed" in sentence
    clause = missing_clause(["libxcb-cursor.so.0", "libxcb-icccm.so.4", "libxcb-xinerama.so.0"])
    assert "sudo apt install libxcb-cursor0 libxcb-icccm4 libxcb-xinerama0" in clause
    assert "sudo dnf install xcb-util-cursor xcb-util-wm libxcb" in clause
    assert {"libxcb-cursor.so.0", "libxcb-keysyms.so.1", "libxkbcommon-x11.so.0"} <= set(XCB_PACKAGES)


def test_a_display_no_server_answers(complete_plugin: Path) -> None:
    assert "no X server answers on DISPLAY=:93" in platform_problem({"DISPLAY": ABSENT_DISPLAY}, complete_plugin)
    assert "DISPLAY is unset" in platform_problem({"QT_QPA_PLATFORM": "xcb"}, complete_plugin)
    assert "no X server answers" in platform_problem({"DISPLAY": "127.0.0.1:93"}, complete_plugin)


def test_a_socket_that_hangs_up_is_no_x_server(complete_plugin: Path, tmp_path: Path) -> None:
    folder = Path("/tmp/.X11-unix")
    number = next(n for n in range(190, 250) if not (folder / f"X{n}").exists())
    folder.mkdir(mode=0o1777, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(folder / f"X{number}"))
    listener.listen(1)

    def hang_up() -> None:
        connection, _ = listener.accept()
        connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        assert "no X server answers" in platform_problem({"DISPLAY": f":{number}"}, complete_plugin)
    finally:
        listener.close()
        (folder / f"X{number}").unlink()


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="no Xvfb here to be the X server")
def test_a_display_a_server_answers(complete_plugin: Path) -> None:
    number = 194
    server = subprocess.Popen(["Xvfb", f":{number}", "-nolisten", "tcp"], stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if Path(f"/tmp/.X11-unix/X{number}").exists():
                break
            threading.Event().wait(0.05)
        assert platform_problem({"DISPLAY": f":{number}"}, complete_plugin) is None
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_wayland_and_headless_platforms_are_left_to_qt(plugin_missing_a_library: Path, tmp_path: Path) -> None:
    compositor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    compositor.bind(str(tmp_path / "wayland-7"))
    try:
        wayland = {"WAYLAND_DISPLAY": "wayland-7", "XDG_RUNTIME_DIR": str(tmp_path), "XDG_SESSION_TYPE": "wayland"}
        assert platform_problem(wayland, plugin_missing_a_library) is None
        assert platform_problem({**wayland, "QT_QPA_PLATFORM": "wayland"}, plugin_missing_a_library) is None
    finally:
        compositor.close()
    for platform in ("offscreen", "minimal", "vnc", "offscreen;xcb"):
        assert platform_problem({"QT_QPA_PLATFORM": platform, "DISPLAY": ABSENT_DISPLAY},
                                plugin_missing_a_library) is None
    gone = platform_problem({"QT_QPA_PLATFORM": "wayland", "WAYLAND_DISPLAY": "wayland-8",
                             "XDG_RUNTIME_DIR": str(tmp_path)}, plugin_missing_a_library)
    assert gone is not None and "no Wayland compositor listens at WAYLAND_DISPLAY=wayland-8" in gone
