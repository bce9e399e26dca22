"""How each model file is loaded, remembered per file: context length, GPU layers, KV cache type and threads.

`LoadSettingsStore` keeps them in `<config dir>/model-load-settings.json` (written atomically), keyed by the file's
absolute path; a file never configured gets `ModelLoadSettings()`, whose zeros and Nones defer to the app's Settings
(threads, GPU layers). `memory_cost` is what loading costs with those settings, from qdesk's own estimate
(`qdesk.memory.estimate_memory`: weights, KV cache and compute buffers, in RAM and VRAM), before anything loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from converters.core.atomic import atomic_output
from converters.core.paths import config_dir
from qdesk.app.errors import UserError
from qdesk.chat.engine import LoadOptions
from qdesk.memory import KV_TYPES, MemoryEstimate, estimate_memory

__all__ = ["DEFAULT_CONTEXT", "KV_CHOICES", "STORE_NAME", "LoadSettingsStore", "ModelLoadSettings", "memory_cost"]

DEFAULT_CONTEXT = 4096
KV_CHOICES = ("f16", "q8_0", "q4_0")
"""The KV cache types offered: full precision, and two that fit a longer context in less memory."""
STORE_NAME = "model-load-settings.json"


@dataclass(frozen=True)
class ModelLoadSettings:
    n_ctx: int = DEFAULT_CONTEXT
    gpu_layers: int | None = None
    """None: the app's setting; -1 all layers; 0 the CPU only."""
    kv_type: str = "f16"
    threads: int = 0
    """0: the app's setting (itself 0 for the cores shared between the loaded models)."""

    def check(self) -> ModelLoadSettings:
        if self.n_ctx < 1 or self.threads < 0 or (self.gpu_layers is not None and self.gpu_layers < -1):
            raise UserError("A context of at least 1 token, 0 or more threads and -1 (all) or more GPU layers are "
                            "needed; correct the load settings.")
        if self.kv_type not in KV_TYPES:
            raise UserError(f"The KV cache type must be one of {', '.join(KV_CHOICES)}, not {self.kv_type!r}.")
        return self

    def options(self, *, default_threads: int, default_gpu_layers: int) -> LoadOptions:
        """The engine's options: these settings, the app's where these defer to it."""
        return LoadOptions(n_ctx=self.n_ctx, n_threads=self.threads or default_threads or None,
                           n_gpu_layers=default_gpu_layers if self.gpu_layers is None else self.gpu_layers,
                           kv_type=self.kv_type)

    @classmethod
    def from_json(cls, document: Any) -> ModelLoadSettings:
        """The settings in `document`, the default for anything missing or of the wrong kind."""
        if not isinstance(document, dict):
            return cls()
        values: dict[str, Any] = {}
        for item in fields(cls):
            value = document.get(item.name)
            if item.name == "kv_type":
                if value in KV_TYPES:
                    values[item.name] = value
            elif isinstance(value, int) and not isinstance(value, bool):
                values[item.name] = value
        try:
            return replace(cls(), **values).check()
        except UserError:
            return cls()


def memory_cost(path: str | os.PathLike[str], settings: ModelLoadSettings, *, default_gpu_layers: int = 0
                ) -> MemoryEstimate:
    """What loading `path` with `settings` takes: qdesk's estimate of weights, KV cache and compute buffers."""
    layers = default_gpu_layers if settings.gpu_layers is None else settings.gpu_layers
    return estimate_memory(path, n_ctx=settings.n_ctx, n_gpu_layers=layers, kv_type=settings.kv_type)


class LoadSettingsStore:
    """Per-file load settings in one JSON file; reads it at every call, so two windows stay in step."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_dir() / STORE_NAME

    def _read(self) -> dict[str, Any]:
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return document if isinstance(document, dict) else {}

    def get(self, model: str | os.PathLike[str]) -> ModelLoadSettings:
        return ModelLoadSettings.from_json(self._read().get(_key(model)))

    def set(self, model: str | os.PathLike[str], settings: ModelLoadSettings) -> None:
        """Remember `settings` for `model` (the defaults: forget it)."""
        document = self._read()
        if settings.check() == ModelLoadSettings():
            document.pop(_key(model), None)
        else:
            document[_key(model)] = asdict(settings)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(self.path) as staging:
                staging.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        except OSError as error:
            raise UserError(f"Cannot save the load settings to {self.path} ({error.strerror or error}); check "
                            "that you can write to qdesk's config folder.") from error


def _key(model: str | os.PathLike[str]) -> str:
    return str(Path(model).expanduser().absolute())
