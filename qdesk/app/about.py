"""What qdesk is made of and where it keeps things: versions, compute backends and folders (`qdesk about`).

`about()` gathers the versions (qdesk, llama-cpp-python and the llama.cpp it ships, Python, and whatever the caller
adds, such as the desktop app's Qt), the backends llama.cpp finds here, and `places()`: the settings, conversations,
models folder, caches, log file and Hugging Face cache, each as the environment sets it now.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["About", "Place", "about", "places", "render_about"]


@dataclass(frozen=True)
class Place:
    what: str
    path: Path
    setting: str
    """The environment variable (or setting) that moves it."""


def places(models_folder: Path | None = None) -> list[Place]:
    """Where qdesk reads and writes, as configured now."""
    from converters.core.paths import cache_dir, config_dir, models_dir
    from qdesk.app.logs import log_path
    from qdesk.app.settings import settings_path
    from qdesk.chat.conversations import default_conversations_dir
    from qdesk.hub.settings import hub_cache_dir

    return [
        Place("Settings", settings_path(), "QDESK_CONFIG_DIR"),
        Place("Window state", config_dir() / "window.ini", "QDESK_CONFIG_DIR"),
        Place("Conversations", default_conversations_dir(), "QDESK_CONFIG_DIR"),
        Place("Models folder", models_folder or models_dir(), "Settings, or QDESK_MODELS_DIR"),
        Place("Caches (reference logits, sensitivities, step times)", cache_dir(), "QDESK_CACHE_DIR"),
        Place("Log file", log_path(), "QDESK_CACHE_DIR"),
        Place("Hugging Face cache", hub_cache_dir(), "Settings, or HF_HUB_CACHE / HF_HOME"),
    ]


@dataclass(frozen=True)
class About:
    versions: dict[str, str]
    backends: list[str]
    places: list[Place] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"versions": dict(self.versions), "backends": list(self.backends),
                "places": [{"what": place.what, "path": str(place.path), "setting": place.setting}
                           for place in self.places]}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def about(extra_versions: dict[str, str] | None = None, *, models_folder: Path | None = None,
          backends: bool = True) -> About:
    """Versions, backends (llama.cpp's discovery; `backends=False` skips it) and places."""
    from qdesk import __version__

    versions = {"qdesk": __version__, "llama-cpp-python": _version("llama-cpp-python")}
    lines: list[str] = []
    if backends:
        from native.backends import discover
        from qdesk.display.backends import describe_backends

        info = discover()
        if info.llama_cpp_version != versions["llama-cpp-python"]:
            versions["llama.cpp"] = info.llama_cpp_version
        else:
            versions["llama-cpp-python"] += " (with its own build of llama.cpp)"
        lines = describe_backends(info)
    versions.update(extra_versions or {})
    versions["Python"] = f"{platform.python_version()} ({platform.system()} {platform.machine()})"
    return About(versions, lines, places(models_folder))


def render_about(info: About) -> str:
    from qdesk.display.tables import text_table

    lines = text_table(None, list(info.versions.items()))
    if info.backends:
        lines += ["", "Backends:", *(f"  {line}" for line in info.backends)]
    lines += ["", "Where qdesk keeps things:"]
    lines += [f"  {place.what}: {place.path}  ({place.setting})" for place in info.places]
    return "\n".join(lines)
