"""Tiny test checkpoints for the bundle's smoke test: `python packaging/smoke_checkpoints.py FOLDER`.

Writes FOLDER/tiny (safetensors) and FOLDER/tiny-bin (pytorch_model.bin), both tiny random Llamas made by the test
builders with the development venv's transformers and torch; the bundle itself then converts them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_checkpoints(folder: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from tests.builders.checkpoints import build_tiny_checkpoint

    return (build_tiny_checkpoint(folder / "tiny", "llama"),
            build_tiny_checkpoint(folder / "tiny-bin", "llama", weights_format="bin"))


if __name__ == "__main__":
    for path in write_checkpoints(Path(sys.argv[1])):
        print(f"wrote {path}")
