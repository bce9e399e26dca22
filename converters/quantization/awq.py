"""Activation-aware scaling (AWQ's idea) in an ordinary GGUF: weights scaled per input channel before rounding.

For a matrix W reading the input x, W x = (W·diag(s)) (diag(s)⁻¹ x) for any positive s. Rounding W·diag(s)
instead of W moves the rounding error between input channels: a channel scaled up keeps its weights on a finer
grid relative to their size, at the cost of the others in its blocks. AWQ (Lin et al., 2023) scales up the channels
whose activations are large, s = a^α with a the channels' activation magnitude, choosing α by the output error.
Here:

* a_j = √E[x_j²], from the importance matrix (the mean squared activation of each input column);
* for each distinct input, α ∈ {0, 0.1, …, 1} is chosen for the smallest Σ_ij E[x_j²] (ΔW_ij)² over sampled rows
  of every matrix that reads it, ΔW being the round trip of W·diag(s) through the matrix's planned type (ggml's
  encoder, with the importance the quantizer will see, E[x_j²] / s_j²), divided by s, minus W: the damage the
  mix measures. α = 0 is s = 1, so no input's damage grows;
* diag(s)⁻¹ is folded into what produces the input, where the graph lets it be exact: the RMS norm's weight
  before q, k and v (attn_norm) and before gate and up (ffn_norm); ffn_up's rows before ffn_down (which reads
  silu(gate x) ⊙ up x); attn_v's rows and bias before attn_output (attention mixes tokens, not channels). With
  grouped-query attention a value channel feeds `n_head / n_head_kv` query heads, whose attn_output columns then
  share its scale.

The scaled model computes the same function (up to the F16 rounding of the scaled weights) and has the same
tensors and types: an ordinary GGUF. Its importance matrix is the original's divided by s² on the scaled columns
(`scaled_matrix`). The token embedding and the output matrix are not scaled.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from converters.calibration.imatrix import ImatrixEntry, ImportanceMatrix
from converters.core.atomic import check_free_space
from converters.core.errors import UserError
from converters.core.gguf_file import GGUFHeader, check_gguf, open_gguf
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.core.leftovers import temporary_folder
from converters.writing.rewrite import FLOAT_TYPES, as_float, rewrite_gguf, row_steps

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
"""Graphs whose norms, ffn_up and attn_v feed the scaled matrices directly, as folded here."""
ALPHAS = tuple(step / 10 for step in range(11))
MAGNITUDE_FLOOR = 1e-3
"""Channels quieter than this share of the loudest are scaled as if they were this loud, so no scale (after
centring, at most ~30× either way) takes a weight out of F16's range."""
SEARCH_ROWS = 64
"""Rows per matrix (evenly spaced) on which each α is tried."""
METADATA_KEY = "qdesk.awq"
UNROUNDED = frozenset({"f32", "f16", "bf16"})


class AwqError(UserError):
    """Activation-aware scaling cannot be applied to this model as asked."""


@dataclass(frozen=True)
class ScalingGroup:
    """One distinct input: the matrices that read it and what produces it."""

    name: str
    consumers: tuple[str, ...]
    divided: str
    """The tensor divided by s: a norm's weight (1-D) or a matrix whose rows are the input's channels."""
    divided_bias: str | None = None
    repeat: int = 1
    """How many query heads each value head feeds (grouped-query attention): attn_output's columns of those heads
    share the value channel's scale."""
    head_dim: int = 0

    def columns(self, scales: np.ndarray) -> np.ndarray:
        """The consumers' column scales for the channels' `scales`."""
        if self.repeat == 1:
            return scales
        by_head = scales.reshape(-1, 1, self.head_dim)
        return np.repeat(by_head, self.repeat, axis=1).reshape(-1)

    def channel_means(self, column_means: np.ndarray) -> np.ndarray:
        """The consumers' per-column mean squares averaged over the columns one channel's scale serves."""
        if self.repeat == 1:
            return column_means
        return column_means.reshape(-1, self.repeat, self.head_dim).mean(axis=1).reshape(-1)


@dataclass(frozen=True)
class GroupScale:
    group: ScalingGroup
    alpha: float
    scales: np.ndarray
    """One per channel of the input as its producer writes it."""
    damage_before: float
    damage_after: float


@dataclass(frozen=True)
class ScaledReference:
    path: Path
    matrix: ImportanceMatrix
    scales: tuple[GroupScale, ...]

    def metadata(self) -> dict[str, str]:
        return {METADATA_KEY: describe(self.scales)}


def describe(scales: Sequence[GroupScale]) -> str:
    """One line: how many inputs were scaled, the mean α, and the damage kept."""
    scaled = [scale for scale in scales if scale.alpha > 0]
    before = sum(scale.damage_before for scale in scales)
    after = sum(scale.damage_after for scale in scales)
    mean_alpha = float(np.mean([scale.alpha for scale in scales])) if scales else 0.0
    kept = after / before if before > 0 else 1.0
    return (f"{len(scaled)} of {len(scales)} inputs scaled, mean alpha {mean_alpha:.2f}, importance-weighted damage "
            f"{kept:.3f} of unscaled")


def scaling_groups(header: GGUFHeader, file_name: str) -> list[ScalingGroup]:
    """The inputs that can be scaled exactly in this model's graph; AwqError for another architecture."""
    metadata = header.metadata
    architecture = str(metadata.get("general.architecture"))
    if architecture not in SUPPORTED_ARCHITECTURES:
        known = ", ".join(SUPPORTED_ARCHITECTURES)
        raise AwqError(f"activation-aware scaling knows where to fold its scales in {known} models, and {file_name} "
                       f"is a {architecture} model; quantize it without --awq.")
    shapes = {tensor.name: tensor.shape for tensor in header.tensors}
    names = set(shapes)
    heads = int(metadata.get(f"{architecture}.attention.head_count", 1))
    kv_heads = int(metadata.get(f"{architecture}.attention.head_count_kv", heads))
    groups = []
    for layer in range(int(metadata.get(f"{architecture}.block_count", 0))):
        prefix = f"blk.{layer}."

        def have(*roles: str, prefix: str = prefix) -> bool:
            return all(f"{prefix}{role}.weight" in names for role in roles)

        if have("attn_norm", "attn_q", "attn_k", "attn_v"):
            groups.append(ScalingGroup(f"{prefix}attn_norm", tuple(f"{prefix}attn_{r}.weight" for r in "qkv"),
                                       f"{prefix}attn_norm.weight"))
        if have("ffn_norm", "ffn_gate", "ffn_up"):
            groups.append(ScalingGroup(f"{prefix}ffn_norm", (f"{prefix}ffn_gate.weight", f"{prefix}ffn_up.weight"),
                                       f"{prefix}ffn_norm.weight"))
        if have("ffn_gate", "ffn_up", "ffn_down"):
            groups.append(ScalingGroup(f"{prefix}ffn_up", (f"{prefix}ffn_down.weight",), f"{prefix}ffn_up.weight",
                                       _bias(prefix + "ffn_up", names)))
        if have("attn_v", "attn_output") and kv_heads > 0 and heads % kv_heads == 0:
            head_dim = int(shapes[f"{prefix}attn_v.weight"][1]) // kv_heads
            groups.append(ScalingGroup(f"{prefix}attn_v", (f"{prefix}attn_output.weight",), f"{prefix}attn_v.weight",
                                       _bias(prefix + "attn_v", names), heads // kv_heads, head_dim))
    return groups


def _bias(stem: str, names: set[str]) -> str | None:
    return f"{stem}.bias" if f"{stem}.bias" in names else None


def search_scales(reference: Path, matrix: ImportanceMatrix, types: Mapping[str, str], *,
                  progress: ProgressFn = no_progress, cancel: CancelToken | None = None) -> tuple[GroupScale, ...]:
    """Each scalable input's α and scales for quantizing `reference` to `types` (tensor name → type)."""
    reference = Path(reference)
    header = check_gguf(reference)
    groups = scaling_groups(header, reference.name)
    reader = open_gguf(reference)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    problem = next((name for group in groups for name in (*group.consumers, group.divided)
                    if tensors[name].tensor_type not in FLOAT_TYPES), None)
    if problem is not None:
        raise AwqError(f"{reference.name} stores {problem} as {tensors[problem].tensor_type.name}, and scaling needs "
                       "a float reference (F32, F16, BF16); quantize from the HF checkpoint or an F16 GGUF.")
    found = []
    for index, group in enumerate(groups):
        if cancel is not None:
            cancel.raise_if_cancelled()
        progress(Progress(index, len(groups), "inputs", f"searching activation-aware scales: {group.name}"))
        found.append(_search(group, tensors, matrix, types))
    progress(Progress(len(groups), len(groups), "inputs", "activation-aware scales found"))
    return tuple(found)


def _search(group: ScalingGroup, tensors: Mapping[str, Any], matrix: ImportanceMatrix,
            types: Mapping[str, str]) -> GroupScale:
    from native.kernels import dequantize_rows, quantize_rows

    entries = [matrix.entries.get(name) for name in group.consumers]
    rounded = [name for name in group.consumers if types.get(name, "f16").lower() not in UNROUNDED]
    width = int(tensors[group.consumers[0]].shape[0])
    channels = width // group.repeat
    identity = np.ones(channels, dtype=np.float32)
    if not rounded or any(entry is None or entry.n_mat != 1 for entry in entries):
        return GroupScale(group, 0.0, identity, 0.0, 0.0)
    column_means = np.mean([entry.mean_squares() for entry in entries if entry is not None], axis=0)
    rms = np.sqrt(np.maximum(group.channel_means(column_means), 0.0))
    magnitude = np.maximum(rms, max(float(rms.max()), 1e-12) * MAGNITUDE_FLOOR)
    samples = {}
    for name in rounded:
        rows = int(np.prod(tensors[name].shape[1:]))
        picked = np.unique(np.linspace(0, rows - 1, min(SEARCH_ROWS, rows)).astype(np.int64))
        samples[name] = (as_float(tensors[name], rows=picked), rows / picked.size)

    def damage(scales: np.ndarray) -> float:
        columns = group.columns(scales).astype(np.float32)
        importance = (column_means / np.square(columns)).astype(np.float32)
        total = 0.0
        for name, (weights, weight_of_sample) in samples.items():
            type_name = types[name]
            encoded = quantize_rows(weights * columns, type_name, importance, threads=1)
            back = dequantize_rows(encoded, type_name, *weights.shape) / columns
            total += weight_of_sample * float((np.square(back - weights, dtype=np.float64) @ column_means).sum())
        return total

    before = damage(identity)
    best_alpha, best_scales, best_damage = 0.0, identity, before
    for alpha in ALPHAS[1:]:
        scales = magnitude**alpha
        scales = (scales / np.sqrt(scales.max() * scales.min())).astype(np.float32)
        found = damage(scales)
        if found < best_damage:
            best_alpha, best_scales, best_damage = alpha, scales, found
    return GroupScale(group, best_alpha, best_scales, before, best_damage)


def scaled_matrix(matrix: ImportanceMatrix, scales: Sequence[GroupScale]) -> ImportanceMatrix:
    """The importance matrix of the scaled model: each scaled matrix's inputs are x / s."""
    entries = dict(matrix.entries)
    for scale in scales:
        if scale.alpha == 0:
            continue
        columns = np.square(scale.group.columns(scale.scales).astype(np.float64))
        for name in scale.group.consumers:
            entry = entries.get(name)
            if entry is not None:
                entries[name] = ImatrixEntry(entry.sums / columns[np.newaxis, :], entry.counts.copy())
    return replace(matrix, entries=entries)


def write_scaled(reference: Path, output: Path, scales: Sequence[GroupScale], *,
                 progress: ProgressFn = no_progress, cancel: CancelToken | None = None) -> None:
    """`reference` with every scaled input's consumers multiplied by s per column and its producer divided."""
    columns: dict[str, np.ndarray] = {}
    divisors: dict[str, np.ndarray] = {}
    for scale in scales:
        if scale.alpha == 0:
            continue
        for name in scale.group.consumers:
            columns[name] = scale.group.columns(scale.scales)
        for name in (scale.group.divided, scale.group.divided_bias):
            if name is not None:
                divisors[name] = scale.scales
    changed = {name: (lambda tensor, name=name: _rescaled(tensor, columns.get(name), divisors.get(name)))
               for name in {*columns, *divisors}}
    rewrite_gguf(open_gguf(reference), output, changed, {}, progress,
                 cancel or CancelToken())


def _rescaled(tensor: Any, columns: np.ndarray | None, divisors: np.ndarray | None) -> Iterator[np.ndarray]:
    if len(tensor.shape) == 1:
        assert divisors is not None
        yield as_float(tensor).reshape(-1) / divisors
        return
    for start, stop in row_steps(tensor):
        rows = as_float(tensor, start, stop)
        if columns is not None:
            rows = rows * columns[np.newaxis, :]
        if divisors is not None:
            rows = rows / divisors[start:stop, np.newaxis]
        yield rows


@contextmanager
def awq_reference(reference: Path, matrix: ImportanceMatrix, types: Mapping[str, str], scratch: Path, *,
                  progress: ProgressFn = no_progress, cancel: CancelToken | None = None
                  ) -> Iterator[ScaledReference]:
    """The scaled copy of `reference` for quantizing to `types`, in a temporary folder under `scratch` (same file
    name, so the quantized file names its source as before), with its importance matrix; removed afterwards."""
    scales = search_scales(reference, matrix, types, progress=progress, cancel=cancel)
    folder = temporary_folder(scratch, "awq")
    try:
        path = folder / Path(reference).name
        check_free_space(path, Path(reference).stat().st_size)
        write_scaled(reference, path, scales, progress=progress, cancel=cancel)
        yield ScaledReference(path, scaled_matrix(matrix, scales), scales)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
