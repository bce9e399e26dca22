"""The user's preferences: models folder, threads, GPU layers, theme, font size, sampling defaults and the Hub's
endpoint and cache folder.

Stored as JSON in `$QDESK_CONFIG_DIR/settings.json` (default: the platform's user config folder). The desktop app
edits them; the file is written atomically, and an unreadable or partly invalid file falls back to the defaults
for what it gets wrong, so a bad edit never stops qdesk from starting.
"""

from __future__ import annotations

import json
import os
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from converters.core.atomic import atomic_output
from converters.core.paths import config_dir, models_dir
from qdesk.chat.engine import SamplingOptions

SETTINGS_NAME = "settings.json"
THEMES = ("system", "light", "dark")


@dataclass(frozen=True)
class Settings:
    models_dir: str = ""
    """Empty: the default models folder (`QDESK_MODELS_DIR`, else the platform data folder)."""
    threads: int = 0
    """0: one thread per CPU core."""
    gpu_layers: int = 0
    """Layers to offload to the GPU; -1 for all of them."""
    theme: str = "system"
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    system_prompt: str = ""
    font_size: int = 0
    """Points for the whole window; 0: the system's."""
    hf_endpoint: str = ""
    """The Hub (or a mirror) to search and download from; empty: HF_ENDPOINT, else huggingface.co."""
    hf_cache_dir: str = ""
    """The Hugging Face cache folder; empty: HF_HUB_CACHE / HF_HOME, else ~/.cache/huggingface/hub."""
    rpc_workers: str = ""
    """`host:port` of llama.cpp RPC workers (`qdesk worker`), comma-separated, for the models Serve loads."""

    def models_path(self) -> Path:
        return Path(self.models_dir).expanduser() if self.models_dir else models_dir()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, document: Any) -> Settings:
        """The settings in `document`, keeping the default for every key that is missing or of the wrong kind."""
        if not isinstance(document, dict):
            return cls()
        defaults = cls()
        values: dict[str, Any] = {}
        for item in fields(cls):
            if item.name == "sampling":
                continue
            value = document.get(item.name, getattr(defaults, item.name))
            if isinstance(value, type(getattr(defaults, item.name))) and not isinstance(value, bool):
                values[item.name] = value
        if values.get("theme") not in THEMES:
            values.pop("theme", None)
        sampling = document.get("sampling")
        if isinstance(sampling, dict):
            values["sampling"] = SamplingOptions.from_json(sampling)
        return replace(defaults, **values)


HUB_VARIABLES = {"hf_endpoint": "HF_ENDPOINT", "hf_cache_dir": "HF_HUB_CACHE"}
"""The settings that reach the Hub through the variables `qdesk.hub.settings.HubSettings` reads at each call."""
SET_BY_QDESK = "QDESK_HUB_VARIABLES"
"""Which of those variables qdesk itself set (so that a later change of the setting may change or clear them)."""


def apply_hub_settings(settings: Settings, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put the Hub settings into the environment, where `HubSettings.from_environment()` (and huggingface_hub) read
    them: a variable the user set outside qdesk wins over the setting; one qdesk set before follows the setting
    (cleared with it). Returns the variables qdesk set."""
    environ = os.environ if environ is None else environ
    ours = set(filter(None, environ.get(SET_BY_QDESK, "").split(",")))
    applied = {}
    for name, variable in HUB_VARIABLES.items():
        value = str(getattr(settings, name)).strip()
        if variable in environ and variable not in ours:
            continue
        if value:
            environ[variable] = str(Path(value).expanduser()) if name == "hf_cache_dir" else value.rstrip("/")
            ours.add(variable)
            applied[variable] = environ[variable]
        elif variable in ours:
            environ.pop(variable, None)
            ours.discard(variable)
    if ours:
        environ[SET_BY_QDESK] = ",".join(sorted(ours))
    else:
        environ.pop(SET_BY_QDESK, None)
    return applied


def settings_path() -> Path:
    return config_dir() / SETTINGS_NAME


def load_settings(path: Path | None = None) -> Settings:
    """The saved settings, or the defaults when there are none or the file cannot be read."""
    path = path or settings_path()
    try:
        return Settings.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return Settings()


def save_settings(settings: Settings, path: Path | None = None) -> None:
    """Write `settings` atomically: a crash mid-way leaves the previous file."""
    path = path or settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as staging:
        staging.write_text(json.dumps(settings.to_json(), indent=2) + "\n", encoding="utf-8")
