"""The native bridge refuses, with one sentence, a llama-cpp-python other than the one it was written for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_another_llama_cpp_python_is_named_and_refused(tmp_path: Path) -> None:
    impostor = tmp_path / "llama_cpp"
    impostor.mkdir()
    (impostor / "__init__.py").write_text('__version__ = "0.3.2"\n')
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    result = subprocess.run([sys.executable, "-m", "qdesk", "backends"], capture_output=True, text=True,
                            env=environment, timeout=120)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "0.3.36" in result.stderr and "0.3.2 is installed" in result.stderr


def test_the_pinned_library_passes_its_layout_check() -> None:
    import llama_cpp

    from native.ggml import EXPECTED_LLAMA_CPP_PYTHON, ggml

    assert llama_cpp.__version__ == EXPECTED_LLAMA_CPP_PYTHON
    lib = ggml()
    assert lib.type_name(lib.type_id("q4_K")) == "q4_K"
    assert lib.op_mul_mat != lib.op_mul_mat_id
