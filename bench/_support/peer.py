"""llama.cpp's own `convert_hf_to_gguf.py`, run as the comparator (never imported, never copied into the repo).

It ships in the llama-cpp-python source distribution pinned by the project. The script, its `conversion`
package and its own `gguf-py` are extracted into the benchmark cache.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

PEER_VERSION = "0.3.36"
_SDIST = f"llama_cpp_python-{PEER_VERSION}.tar.gz"
_VENDOR = f"llama_cpp_python-{PEER_VERSION}/vendor/llama.cpp/"
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def peer_converter(cache: Path, log: Callable[[str], None] = print) -> Path:
    """The folder holding convert_hf_to_gguf.py (and gguf-py/ beside it), fetched and extracted on first use."""
    peer = cache / "peer"
    target = peer / f"llama.cpp-{PEER_VERSION}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    peer.mkdir(parents=True, exist_ok=True)
    sdist = peer / _SDIST
    if not sdist.is_file():
        log(f"downloading llama-cpp-python {PEER_VERSION} source distribution for its convert_hf_to_gguf.py")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={PEER_VERSION}", "-d", str(peer)],
            check=True,
        )
    staging = peer / ".extracting"
    with tarfile.open(sdist) as tar:
        wanted = [
            m for m in tar.getmembers()
            if m.name.startswith(_VENDOR) and m.name[len(_VENDOR):].startswith(_MEMBERS)
        ]
        for member in wanted:
            member.name = member.name[len(_VENDOR):]
        tar.extractall(staging, members=wanted, filter="data")
    staging.rename(target)
    return target


def peer_command(folder: Path, source: Path, output: Path, outtype: str) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment that run the peer with its own gguf-py."""
    command = [sys.executable, str(folder / "convert_hf_to_gguf.py"), str(source),
               "--outfile", str(output), "--outtype", outtype]
    return command, {"PYTHONPATH": str(folder / "gguf-py")}
