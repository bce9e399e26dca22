"""A Hugging Face checkpoint folder: its config and an index of its weight tensors, read lazily.

Weights come from one `model.safetensors`, shards listed in `model.safetensors.index.json`, or
`pytorch_model*.bin` files loaded with `torch.load(weights_only=True)` (never arbitrary pickles).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.core.errors import CheckpointError, UnsupportedModelError
from converters.reading.architectures.base import ModelConfig
from converters.reading.safetensors_file import FLOAT_DTYPES, SafetensorsFile, unsupported_dtype

RowReader = Callable[[int, int], np.ndarray]
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
READ_FILES = ("config.json", "README.md", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja",
              "chat_template.json", "generation_config.json", *WEIGHT_INDEXES)
"""The files besides the weights that reading a checkpoint may open (gguf-py's vocabulary and model-card readers
included)."""


@dataclass(frozen=True)
class SourceTensor:
    """One weight tensor of the checkpoint, not yet read: shape, stored dtype and a row-range reader."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    read_rows: RowReader

    @property
    def element_count(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def load(self) -> np.ndarray:
        """The whole tensor as float32."""
        return self.read_rows(0, self.rows)


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    config: ModelConfig
    tensors: dict[str, SourceTensor]
    weight_files: tuple[Path, ...]

    @property
    def weight_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.weight_files)


def resolve_checkpoint_folder(source: Path) -> Path:
    """The checkpoint folder for a folder, or for a file inside one (config.json, a .safetensors shard)."""
    source = Path(source)
    if not source.exists():
        raise CheckpointError(f"{source} does not exist; give the path of a Hugging Face checkpoint folder.")
    if source.is_file() and source.suffix in (".safetensors", ".json", ".bin"):
        return source.parent
    if source.is_file():
        raise CheckpointError(
            f"{source} is a file; give the Hugging Face checkpoint folder that holds config.json."
        )
    return source


def checkpoint_files(folder: Path) -> list[Path]:
    """The files of a checkpoint folder that a conversion may read (every file but GGUF and hidden ones): the
    files no output may replace."""
    try:
        return sorted(path for path in folder.iterdir()
                      if path.is_file() and path.suffix != ".gguf" and not path.name.startswith("."))
    except OSError:
        return []


def _allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Where the files of `folder` may really be: the folder itself, and for a snapshot of the Hugging Face cache
    (`models--org--name/snapshots/REV`, or a folder inside one, whose files link to `…/blobs/HASH`) its
    repository's blobs."""
    roots = [folder.resolve()]
    for snapshot in (folder, *folder.parents):
        if snapshot.parent.name == "snapshots" and snapshot.parent.parent.name.startswith("models--"):
            roots.append((snapshot.parent.parent / "blobs").resolve())
            break
    return tuple(roots)


def check_inside(folder: Path, paths: Iterable[Path]) -> None:
    """Refuse (CheckpointError) a file of the checkpoint that is, or links to, something outside its folder: qdesk
    reads only the folder the user chose, whatever a downloaded repository's links or index say."""
    roots = _allowed_roots(folder)
    for path in paths:
        if not (path.exists() or path.is_symlink()):
            continue
        real = path.resolve()
        if not any(real.is_relative_to(root) for root in roots):
            raise CheckpointError(f"{path.name} in {folder} leads to {real}, outside the checkpoint folder; qdesk "
                                  "reads only the folder you chose, so copy the file itself into it.")


def read_config(folder: Path) -> ModelConfig:
    check_inside(folder, [folder / name for name in READ_FILES])
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no config.json; a Hugging Face checkpoint folder holds config.json beside its weights."
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); download the checkpoint again.") from error
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; download the checkpoint again.")
    return ModelConfig(values)


def open_checkpoint(source: Path, config: ModelConfig | None = None) -> Checkpoint:
    """Read the config (unless given) and the table of contents of every weight file; no tensor data is read."""
    folder = resolve_checkpoint_folder(source)
    config = config or read_config(folder)
    weight_files = _weight_files(folder)
    check_inside(folder, [*(folder / name for name in READ_FILES), *weight_files])
    tensors: dict[str, SourceTensor] = {}
    for path in weight_files:
        found = _safetensors_tensors(path) if path.suffix == ".safetensors" else _torch_tensors(path)
        tensors.update(found)
    if not tensors:
        raise CheckpointError(f"The weight files in {folder} hold no tensors; download the checkpoint again.")
    return Checkpoint(folder, config, tensors, weight_files)


def _weight_files(folder: Path) -> tuple[Path, ...]:
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if index.is_file():
            return _files_from_index(index)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return (folder / single,)
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        found = sorted(folder.glob(pattern))
        if found:
            return tuple(found)
    raise CheckpointError(
        f"{folder} has no weights (model.safetensors, sharded safetensors with an index, or pytorch_model*.bin); "
        "download the full checkpoint."
    )


def _files_from_index(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{index.name} is malformed ({error}); download the checkpoint again.") from error
    folder = index.parent
    for name in names:
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{index.name} lists the shard {name!r}, which is not a file name inside the "
                                  "checkpoint folder; qdesk reads only the folder you chose, so download the "
                                  "checkpoint again from a source you trust.")
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"Shard {missing[0]} listed in {index.name} is missing from {folder}; download the missing files."
        )
    return tuple(folder / name for name in names)


def _safetensors_tensors(path: Path) -> dict[str, SourceTensor]:
    file = SafetensorsFile(path)

    def reader(entry) -> RowReader:
        return lambda start, stop: file.read_rows(entry, start, stop)

    return {
        name: SourceTensor(name, entry.shape, entry.dtype, reader(entry)) for name, entry in file.entries.items()
    }


_TORCH_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}


def _torch_tensors(path: Path) -> dict[str, SourceTensor]:
    import pickle
    import zipfile

    import torch  # a dependency of qdesk, imported only when a .bin checkpoint is read (it takes a second)

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsupportedModelError(
            f"{path.name} holds Python objects other than tensors and qdesk never runs code from a model "
            "folder; use the model's safetensors release."
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path.name} cannot be read as a PyTorch checkpoint ({error}); download it again.") \
            from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name} does not hold a dictionary of tensors; download it again.")

    def reader(tensor: torch.Tensor) -> RowReader:
        def read(start: int, stop: int) -> np.ndarray:
            part = tensor[start:stop] if tensor.dim() > 0 else tensor
            return part.to(torch.float32).numpy()

        return read

    tensors: dict[str, SourceTensor] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        dtype = _TORCH_DTYPES.get(str(tensor.dtype), str(tensor.dtype))
        tensors[name] = SourceTensor(name, tuple(tensor.shape), dtype, reader(tensor))
    return tensors


def check_dtypes(checkpoint: Checkpoint) -> None:
    """Refuse quantized or integer checkpoints before any output is written."""
    for tensor in checkpoint.tensors.values():
        if tensor.dtype not in FLOAT_DTYPES:
            raise unsupported_dtype(tensor.name, tensor.dtype)
