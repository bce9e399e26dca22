"""Where qdesk keeps its files: each folder from its `QDESK_*` override when set, else the platform's user folder.

| folder | override | default |
|---|---|---|
| settings, conversations | `QDESK_CONFIG_DIR` | `platformdirs.user_config_dir("qdesk")` |
| caches (sensitivities, reference logits) | `QDESK_CACHE_DIR` | `platformdirs.user_cache_dir("qdesk")` |
| the models folder | `QDESK_MODELS_DIR` | `platformdirs.user_data_dir("qdesk")/models` |
| the log file | `QDESK_CACHE_DIR` (its `logs/`) | `platformdirs.user_log_dir("qdesk")` |
| `qdesk demo`'s files | `QDESK_DEMO_DIR` | the cache folder's `demo/` |
| data that ships with qdesk | `QDESK_RESOURCES` | `resources/` beside the packages |

Overrides are read at call time, so a test or a child process that sets one is obeyed at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["CACHE_DIR_ENV", "CONFIG_DIR_ENV", "DEMO_DIR_ENV", "MODELS_DIR_ENV", "RESOURCES_ENV", "cache_dir",
           "config_dir", "demo_dir", "logs_dir", "models_dir", "resources_dir"]

APP_NAME = "qdesk"
CONFIG_DIR_ENV = "QDESK_CONFIG_DIR"
CACHE_DIR_ENV = "QDESK_CACHE_DIR"
MODELS_DIR_ENV = "QDESK_MODELS_DIR"
DEMO_DIR_ENV = "QDESK_DEMO_DIR"
RESOURCES_ENV = "QDESK_RESOURCES"


def _override(variable: str) -> Path | None:
    value = os.environ.get(variable)
    return Path(value).expanduser() if value else None


def config_dir() -> Path:
    """`$QDESK_CONFIG_DIR`, else the platform's user config folder for qdesk."""
    return _override(CONFIG_DIR_ENV) or Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def cache_dir() -> Path:
    """`$QDESK_CACHE_DIR`, else the platform's user cache folder for qdesk (each cache is a folder below it)."""
    return _override(CACHE_DIR_ENV) or Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def models_dir() -> Path:
    """`$QDESK_MODELS_DIR`, else `models` in the platform's user data folder for qdesk."""
    return _override(MODELS_DIR_ENV) or Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)) / "models"


def logs_dir() -> Path:
    """`logs` in `$QDESK_CACHE_DIR` when that is set (a test's or a child's folder keeps its log), else the platform's
    user log folder for qdesk."""
    override = _override(CACHE_DIR_ENV)
    return override / "logs" if override else Path(platformdirs.user_log_dir(APP_NAME, appauthor=False))


def demo_dir() -> Path:
    """`$QDESK_DEMO_DIR`, else `demo` in the cache folder."""
    return _override(DEMO_DIR_ENV) or cache_dir() / "demo"


def resources_dir() -> Path:
    """`$QDESK_RESOURCES`, else the `resources` folder that ships beside the packages (also in the bundle)."""
    return _override(RESOURCES_ENV) or Path(__file__).resolve().parents[2] / "resources"
