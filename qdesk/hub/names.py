"""What a repository's file names say: GGUF quantization types, shards, and names that are unsafe to write.

Pure functions on strings; nothing here touches the network or the disk.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath

from qdesk.hub.errors import UnsafeFileNameError

__all__ = [
    "GGUF",
    "OTHER",
    "SAFETENSORS",
    "ShardName",
    "base_model_name",
    "check_repo_path",
    "file_kind",
    "is_projector",
    "matches_any",
    "quant_type",
    "shard_name",
]

GGUF, SAFETENSORS, OTHER = "gguf", "safetensors", "other"

_QUANT_TYPE = re.compile(
    r"(?<![A-Za-z0-9])"
    r"(?P<type>I?Q[1-8](?:_(?:K|XXS|XS|S|M|L|XL|NL|[0-9]))+|TQ[12]_0|MXFP4(?:_MOE)?|BF16|FP16|FP32|F16|F32|F64)"
    r"(?![A-Za-z0-9])",
    re.IGNORECASE,
)
"""llama.cpp's type names as they appear in file names: Q4_K_M, Q8_0, IQ2_XS, IQ4_NL, Q4_0_4_4, TQ1_0, F16, BF16…"""

_TYPE_ALIASES = {"FP16": "F16", "FP32": "F32"}

_SHARD = re.compile(r"^(?P<base>.+)-(?P<index>\d{1,5})-of-(?P<count>\d{1,5})\.(?P<extension>gguf|safetensors)$",
                    re.IGNORECASE)
"""gguf-split's `-00001-of-00003.gguf` and transformers' `model-00001-of-00002.safetensors`."""

_PROJECTOR = re.compile(r"(?:^|[-_.])mmproj(?:[-_.]|$)", re.IGNORECASE)

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def file_kind(path: str) -> str:
    """"gguf", "safetensors" or "other", from the extension."""
    lowered = path.lower()
    if lowered.endswith(".gguf"):
        return GGUF
    if lowered.endswith(".safetensors"):
        return SAFETENSORS
    return OTHER


def _file_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def quant_type(path: str) -> str | None:
    """The llama.cpp type a GGUF file name announces ("Q4_K_M" for `model-q4_k_m.gguf`), or None.

    The last type-looking word of the name wins, so `Llama-3-8B-Q8_0.gguf` is Q8_0 and a shard suffix is ignored.
    """
    name = _file_name(path)
    shard = _SHARD.match(name)
    stem = shard.group("base") if shard else re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    matches = list(_QUANT_TYPE.finditer(stem))
    if not matches:
        return None
    found = matches[-1].group("type").upper()
    return _TYPE_ALIASES.get(found, found)


@dataclass(frozen=True)
class ShardName:
    """One file of a sharded set: `base`-`index`-of-`count`.`extension`, in folder `folder`."""

    folder: str
    base: str
    index: int
    count: int
    count_text: str
    extension: str

    @property
    def group_key(self) -> tuple[str, str, int, str]:
        return (self.folder, self.base, self.count, self.extension.lower())

    @property
    def pattern(self) -> str:
        """The shards' shared name as a glob (`model-*-of-00003.safetensors`), usable in --include."""
        prefix = f"{self.folder}/" if self.folder else ""
        return f"{prefix}{self.base}-*-of-{self.count_text}.{self.extension}"


def shard_name(path: str) -> ShardName | None:
    """The shard facts of a `-00001-of-00003.gguf` / `.safetensors` name, None for a file that is not a shard."""
    folder, _, name = path.rpartition("/")
    match = _SHARD.match(name)
    if match is None:
        return None
    index, count = int(match.group("index")), int(match.group("count"))
    if count < 1 or not 1 <= index <= count:
        return None
    return ShardName(folder, match.group("base"), index, count, match.group("count"), match.group("extension"))


def is_projector(path: str) -> bool:
    """A multimodal projector (`mmproj-*.gguf`): loaded beside a model, never run on its own."""
    return bool(_PROJECTOR.search(_file_name(path)))


def base_model_name(path: str) -> str:
    """The name without folder, extension, shard suffix and type: the variants of one model share it."""
    name = _file_name(path)
    shard = _SHARD.match(name)
    stem = shard.group("base") if shard else re.sub(r"\.(gguf|safetensors)$", "", name, flags=re.IGNORECASE)
    matches = list(_QUANT_TYPE.finditer(stem))
    if matches:
        last = matches[-1]
        stem = stem[:last.start()] + stem[last.end():]
    return re.sub(r"[-_. ]+$", "", stem).casefold() or name.casefold()


def matches_any(path: str, patterns: Iterable[str]) -> bool:
    """Whether the repository path matches one of the globs (`--include`), case-insensitively."""
    lowered = path.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in patterns)


def check_repo_path(path: str) -> str:
    """`path` itself when it names a file inside the repository; UnsafeFileNameError for anything that could land
    outside the cache folder (`..`, an absolute or drive path, backslashes, empty or control characters)."""
    problem = _path_problem(path)
    if problem is not None:
        raise UnsafeFileNameError(
            f"The repository lists a file named {path!r}, which {problem}; qdesk refuses to download it, since it "
            "could be written outside the cache folder."
        )
    return path


def _path_problem(path: str) -> str | None:
    if not isinstance(path, str) or not path:
        return "is empty"
    if _CONTROL_CHARACTERS.search(path):
        return "holds control characters"
    if "\\" in path:
        return "holds a backslash"
    segments = path.split("/")
    if PurePosixPath(path).is_absolute() or any(PureWindowsPath(segment).drive or PureWindowsPath(segment).root
                                                for segment in segments):
        return "is an absolute or drive path"
    if any(segment in ("", ".", "..") for segment in segments):
        return "holds an empty, '.' or '..' part"
    return None
