"""A GGUF model's shape as the memory estimate needs it: layers, heads, tensor sizes and where they lie."""

from __future__ import annotations

import functools
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.core.errors import GGUFFileError
from converters.core.gguf_file import GGUFHeader, check_gguf
from converters.core.hyperparameters import check_model_gguf


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs from a GGUF: hyperparameters per layer and tensor bytes by placement."""

    architecture: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: tuple[int, ...]
    """Query heads per layer."""
    n_head_kv: tuple[int, ...]
    """KV heads per layer (0 for a layer without a KV cache)."""
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    """Feed-forward width a token goes through (for mixture-of-experts: the used experts' widths together)."""
    n_expert: int
    has_sliding_window: bool
    input_bytes: int
    """Tensors of the input layer (token embedding and anything outside the blocks and the output): always CPU."""
    layer_bytes: tuple[int, ...]
    output_bytes: int
    """`output.weight` and `output_norm`; for tied embeddings only the norm (see `tied_output_bytes`)."""
    tied_output_bytes: int
    """Bytes of `token_embd.weight` when the model has no `output.weight` (llama.cpp then reuses it), else 0."""
    tensor_bytes: int
    tensor_offsets: Mapping[str, int] = field(repr=False, compare=False)
    """Where each tensor's data starts, relative to the data section (for the repack correction of measurements)."""
    tensor_sizes: Mapping[str, int] = field(repr=False, compare=False)

    @property
    def offloadable_layers(self) -> int:
        """llama.cpp's count of offloadable layers: the repeating blocks and the output layer."""
        return self.n_layer + 1


def _per_layer(value: Any, n_layer: int, key: str, path: Path) -> tuple[int, ...]:
    if isinstance(value, list):
        if len(value) != n_layer:
            raise GGUFFileError(f"{path} lists {len(value)} values for {key} but has {n_layer} layers; "
                                "download or convert it again.")
        return tuple(int(v) for v in value)
    return (int(value),) * n_layer


def layer_of(tensor_name: str) -> int | None:
    match = re.match(r"blk\.(\d+)\.", tensor_name)
    return int(match.group(1)) if match else None


OUTPUT_TENSOR_PREFIXES = ("output.", "output_norm.")


def read_model_shape(path: str | os.PathLike[str]) -> ModelShape:
    """The hyperparameters and tensor placement of the GGUF at `path`; raises GGUFFileError for a bad file."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        check_gguf(path)  # the sentence for a missing or unreadable file
        raise
    return _cached_shape(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _cached_shape(path: Path, _mtime_ns: int, _size: int) -> ModelShape:
    """The shape of one version of a file (the cache key holds its modification time and size)."""
    header = check_model_gguf(path)  # first: a clear sentence for a damaged, foreign or impossible file
    try:
        return _shape_from_header(path, header)
    except GGUFFileError:
        raise
    except (ValueError, TypeError, KeyError, struct.error) as error:  # a header gguf accepts that holds nonsense
        raise GGUFFileError(f"{path} has metadata qdesk cannot make sense of ({type(error).__name__}: {error}); "
                            "download or convert it again.") from error


def _shape_from_header(path: Path, header: GGUFHeader) -> ModelShape:
    architecture = header.metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise GGUFFileError(f"{path} does not name its architecture (general.architecture), so qdesk cannot "
                            "estimate its memory; convert it again with a current converter.")
    values = {key.removeprefix(architecture + "."): value for key, value in header.metadata.items()
              if key.startswith(architecture + ".")}

    def number(key: str, default: int | None = None) -> int:
        value = values.get(key, default)
        if value is None:
            raise GGUFFileError(f"{path} lacks {architecture}.{key}, which the memory estimate needs; "
                                "convert it again with a current converter.")
        if isinstance(value, list):
            return max((int(v) for v in value), default=0)
        return int(value)

    n_layer = number("block_count")
    n_embd = number("embedding_length")
    n_head = _per_layer(values.get("attention.head_count", 0), n_layer, "attention.head_count", path)
    n_head_kv = (_per_layer(values["attention.head_count_kv"], n_layer, "attention.head_count_kv", path)
                 if "attention.head_count_kv" in values else n_head)
    largest_head_count = max(n_head, default=0)
    default_head_dim = n_embd // largest_head_count if largest_head_count else 0
    n_expert = number("expert_count", 0)
    n_expert_used = number("expert_used_count", 0)
    if n_expert and n_expert_used:
        n_ff = number("expert_feed_forward_length", number("feed_forward_length", 0)) * n_expert_used
        n_ff += number("expert_shared_feed_forward_length", 0) * number("expert_shared_count", 0)
    else:
        n_ff = number("feed_forward_length", 0)

    tensors = {tensor.name: tensor for tensor in header.tensors}
    token_embd = tensors.get("token_embd.weight")
    output = tensors.get("output.weight")
    vocab_tensor = output or token_embd
    if vocab_tensor is not None and len(vocab_tensor.shape) > 1:
        n_vocab = int(vocab_tensor.shape[1])
    else:
        n_vocab = header.array_lengths.get("tokenizer.ggml.tokens") or number("vocab_size", 0)

    layer_bytes = [0] * n_layer
    input_bytes = output_bytes = 0
    for tensor in header.tensors:
        layer = layer_of(tensor.name)
        if layer is not None and layer < n_layer:
            layer_bytes[layer] += tensor.n_bytes
        elif tensor.name.startswith(OUTPUT_TENSOR_PREFIXES):
            output_bytes += tensor.n_bytes
        else:
            input_bytes += tensor.n_bytes
    return ModelShape(
        architecture=architecture,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_ctx_train=number("context_length", 0),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=number("attention.key_length", default_head_dim),
        head_dim_v=number("attention.value_length", default_head_dim),
        n_ff=n_ff,
        n_expert=n_expert,
        has_sliding_window="attention.sliding_window" in values,
        input_bytes=input_bytes,
        layer_bytes=tuple(layer_bytes),
        output_bytes=output_bytes,
        tied_output_bytes=token_embd.n_bytes if output is None and token_embd is not None else 0,
        tensor_bytes=sum(tensor.n_bytes for tensor in header.tensors),
        tensor_offsets={tensor.name: tensor.offset for tensor in header.tensors},
        tensor_sizes={tensor.name: tensor.n_bytes for tensor in header.tensors},
    )



def read_model_shape_from_prefix(path: str | os.PathLike[str], *, file_size: int,
                                 name: str | None = None) -> ModelShape | None:
    """The shape of a GGUF file of `file_size` bytes from a file holding only its first bytes (a remote file's
    header fetched with HTTP Range requests); None while those bytes end inside the header: fetch more.

    Raises GGUFFileError (naming `name`, default the path) for bytes that are not a readable GGUF header, or a header
    whose tensor data would end past `file_size`.
    """
    from converters.core.gguf_file import header_from_prefix

    label = Path(name) if name else Path(path)
    prefix = Path(path).read_bytes()
    header = header_from_prefix(prefix, str(label))
    if header is None:
        return None
    if header.data_end > file_size:
        raise GGUFFileError(f"{label} is truncated: its tensor data ends at byte {header.data_end:,} but the file "
                            f"has {file_size:,} bytes.")
    try:
        return _shape_from_header(label, header)
    except GGUFFileError:
        raise
    except (ValueError, TypeError, KeyError, struct.error) as error:
        raise GGUFFileError(f"{label} has metadata qdesk cannot make sense of ({type(error).__name__}: "
                            f"{error}).") from error
