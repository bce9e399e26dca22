"""llama-cpp-python loads its libraries with ctypes from llama_cpp/lib, which PyInstaller cannot see by itself.

The wheel holds each library three times (libllama.so, .so.0, .so.0.5.0 as copies, not links). llama_cpp opens
`lib<name>.so`, and the libraries find each other by soname (`lib<name>.so.0`, RUNPATH $ORIGIN), so those two
names are kept and the fully versioned copy is left out.
"""

import re
from pathlib import Path

from PyInstaller.utils.hooks import get_package_paths

_, package_folder = get_package_paths("llama_cpp")
library_folder = Path(package_folder) / "lib"


def _needed(path: Path) -> bool:
    return re.search(r"\.so(\.\d+)?$", path.name) is not None


binaries = [(str(path), "llama_cpp/lib") for path in sorted(library_folder.iterdir()) if _needed(path)]
