"""Whether Qt can open a window here, found out before the QApplication exists: where it cannot, Qt aborts the whole
process (exit 134) instead of returning an error.

On Linux, Qt's X11 platform plugin (`libqxcb.so`) links a dozen X libraries that a minimal Debian, Ubuntu or Fedora
install lacks (libxcb-cursor0 first of all), and it aborts as well when DISPLAY names a server that does not answer.
`platform_problem()` says, in one sentence with the install commands, what stands in the way, or returns None.
Wayland sessions and the headless platforms (offscreen, minimal, vnc, eglfs, linuxfb) are left to Qt.

`python -m qdesk.gui.platform_check` prints the libraries and packages (the desktop bundle ships that list).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["XCB_PACKAGES", "missing_clause", "missing_libraries", "platform_problem", "xcb_plugin"]

XCB_PACKAGES: dict[str, tuple[str, str]] = {
    # library: (Debian/Ubuntu package, Fedora package)
    "libxcb-cursor.so.0": ("libxcb-cursor0", "xcb-util-cursor"),
    "libxcb-icccm.so.4": ("libxcb-icccm4", "xcb-util-wm"),
    "libxcb-keysyms.so.1": ("libxcb-keysyms1", "xcb-util-keysyms"),
    "libxcb-image.so.0": ("libxcb-image0", "xcb-util-image"),
    "libxcb-render-util.so.0": ("libxcb-render-util0", "xcb-util-renderutil"),
    "libxcb-util.so.1": ("libxcb-util1", "xcb-util"),
    "libxkbcommon-x11.so.0": ("libxkbcommon-x11-0", "libxkbcommon-x11"),
    "libxkbcommon.so.0": ("libxkbcommon0", "libxkbcommon"),
    "libxcb-xinerama.so.0": ("libxcb-xinerama0", "libxcb"),
    "libxcb-randr.so.0": ("libxcb-randr0", "libxcb"),
    "libxcb-shape.so.0": ("libxcb-shape0", "libxcb"),
    "libxcb-xfixes.so.0": ("libxcb-xfixes0", "libxcb"),
    "libxcb-sync.so.1": ("libxcb-sync1", "libxcb"),
    "libxcb-xkb.so.1": ("libxcb-xkb1", "libxcb"),
    "libxcb-shm.so.0": ("libxcb-shm0", "libxcb"),
    "libxcb-render.so.0": ("libxcb-render0", "libxcb"),
    "libxcb-xinput.so.0": ("libxcb-xinput0", "libxcb"),
    "libxcb-glx.so.0": ("libxcb-glx0", "libxcb"),
    "libxcb.so.1": ("libxcb1", "libxcb"),
    "libX11-xcb.so.1": ("libx11-xcb1", "libX11-xcb"),
    "libX11.so.6": ("libx11-6", "libX11"),
    "libSM.so.6": ("libsm6", "libSM"),
    "libICE.so.6": ("libice6", "libICE"),
    "libfontconfig.so.1": ("libfontconfig1", "fontconfig"),
    "libfreetype.so.6": ("libfreetype6", "freetype"),
    "libEGL.so.1": ("libegl1", "libglvnd-egl"),
    "libGL.so.1": ("libgl1", "libglvnd-glx"),
    "libOpenGL.so.0": ("libopengl0", "libglvnd-opengl"),
    "libGLX.so.0": ("libglx0", "libglvnd-glx"),
    "libdbus-1.so.3": ("libdbus-1-3", "dbus-libs"),
    "libglib-2.0.so.0": ("libglib2.0-0", "glib2"),
}
"""Libraries the xcb plugin links (directly or through Qt's own libraries) and the packages that provide them."""

_NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found", re.MULTILINE)
_DLOPEN_FAILURE = re.compile(r"(\S+\.so[.\d]*): cannot open shared object file")
_X_TCP_PORT = 6000
_CONNECT_TIMEOUT_S = 3.0


def xcb_plugin() -> Path | None:
    """Qt's X11 platform plugin as this PySide6 ships it (None where there is none)."""
    from PySide6.QtCore import QLibraryInfo

    plugin = Path(QLibraryInfo.path(QLibraryInfo.LibraryPath.PluginsPath)) / "platforms" / "libqxcb.so"
    return plugin if plugin.is_file() else None


def missing_libraries(plugin: Path) -> list[str]:
    """The shared libraries `plugin` needs (directly or through the libraries it links) that cannot be found.

    Asks `ldd`, which lists every one; where there is no ldd, loads the plugin and names the first that fails."""
    ldd = shutil.which("ldd")
    if ldd is not None:
        try:
            listing = subprocess.run([ldd, str(plugin)], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            listing = None
        if listing is not None:
            return list(dict.fromkeys(_NOT_FOUND.findall(listing)))
    try:
        ctypes.CDLL(str(plugin))
    except OSError as error:
        return _DLOPEN_FAILURE.findall(str(error))[:1]
    return []


def _candidates(environ: Mapping[str, str]) -> list[str]:
    """The platform plugins Qt will try, in order."""
    explicit = environ.get("QT_QPA_PLATFORM", "").strip()
    if explicit:
        return [entry.split(":", 1)[0].strip().lower() for entry in explicit.split(";") if entry.strip()]
    if environ.get("WAYLAND_DISPLAY") and environ.get("XDG_SESSION_TYPE", "wayland") == "wayland":
        return ["wayland", "xcb"]
    return ["xcb"]


def platform_problem(environ: Mapping[str, str] | None = None, plugin: Path | None = None) -> str | None:
    """One sentence saying why Qt would abort on opening a window here, or None when nothing stands in the way
    (or the platform is one this does not check). `plugin` is the xcb plugin to check (default: Qt's own)."""
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return None
    reasons: list[str] = []
    for candidate in _candidates(environ) or ["xcb"]:  # Qt falls back from one to the next
        if candidate == "wayland" or candidate.startswith("wayland-"):
            reason = _wayland_problem(environ)
        elif candidate == "xcb":
            reason = _xcb_problem(environ, plugin)
        else:
            return None  # offscreen, minimal, vnc, eglfs…: nothing here for Qt to abort on
        if reason is None:
            return None
        reasons.append(reason)
    return (f"The desktop window cannot open: {' and '.join(reasons)}; otherwise use the command-line tools "
            "(`qdesk --help`).")


def _xcb_problem(environ: Mapping[str, str], plugin: Path | None) -> str | None:
    plugin = plugin or xcb_plugin()
    if plugin is None:
        return None
    missing = missing_libraries(plugin)
    if missing:
        return missing_clause(missing)
    display = environ.get("DISPLAY", "")
    if not display:
        return "DISPLAY is unset, so there is no X server to show it on (start qdesk from your desktop session)"
    if not _x_server_answers(display):
        return (f"no X server answers on DISPLAY={display} (start qdesk from your desktop session, or set DISPLAY "
                "to a running one)")
    return None


def _wayland_problem(environ: Mapping[str, str]) -> str | None:
    name = environ.get("WAYLAND_DISPLAY") or "wayland-0"
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    socket_path = Path(name) if name.startswith("/") else Path(runtime) / name if runtime else None
    if socket_path is not None and socket_path.is_socket():
        return None
    return f"no Wayland compositor listens at WAYLAND_DISPLAY={name}"


def missing_clause(missing: list[str]) -> str:
    """What is missing for Qt's X11 platform, with the commands that install it."""
    debian = " ".join(dict.fromkeys(XCB_PACKAGES.get(name, (name, name))[0] for name in missing))
    fedora = " ".join(dict.fromkeys(XCB_PACKAGES.get(name, (name, name))[1] for name in missing))
    names = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
    verb, them = ("is", "it") if len(missing) == 1 else ("are", "them")
    return (f"Qt's X11 platform needs {names}, which {verb} not installed (install {them} with "
            f"`sudo apt install {debian}` on Debian or Ubuntu, or `sudo dnf install {fedora}` on Fedora)")


def _x_server_answers(display: str) -> bool:
    """Whether an X server accepts a connection on `display` (authorisation included), as Qt will ask it."""
    host, _, rest = display.rpartition(":")
    number = rest.split(".", 1)[0]
    if host not in ("", "unix") and not host.startswith("/") and number.isdigit():
        try:  # a remote server that does not answer would make the X library wait for minutes
            socket.create_connection((host, _X_TCP_PORT + int(number)), timeout=_CONNECT_TIMEOUT_S).close()
        except OSError:
            return False
    name = ctypes.util.find_library("xcb")
    if name is None:
        return True  # no libxcb to ask with; the libraries check has spoken already
    xcb = ctypes.CDLL(name)
    xcb.xcb_connect.restype = ctypes.c_void_p
    xcb.xcb_connect.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    xcb.xcb_connection_has_error.argtypes = [ctypes.c_void_p]
    xcb.xcb_disconnect.argtypes = [ctypes.c_void_p]
    connection = xcb.xcb_connect(display.encode(), None)
    try:
        return xcb.xcb_connection_has_error(connection) == 0
    finally:
        xcb.xcb_disconnect(connection)


def _print_requirements() -> None:
    print("Qt's X11 platform plugin (libqxcb.so) needs these system libraries; install those your system lacks:")
    for name, (debian, fedora) in XCB_PACKAGES.items():
        print(f"  {name:26} Debian/Ubuntu: {debian:22} Fedora: {fedora}")
    debian = " ".join(dict.fromkeys(debian for debian, _ in XCB_PACKAGES.values()))
    fedora = " ".join(dict.fromkeys(fedora for _, fedora in XCB_PACKAGES.values()))
    print(f"\nDebian, Ubuntu: sudo apt install {debian}\nFedora: sudo dnf install {fedora}")


if __name__ == "__main__":
    _print_requirements()
