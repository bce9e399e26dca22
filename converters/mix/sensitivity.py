"""How much each tensor's quantization error moves this model's output: the measured costs the mix is built from.

Measurements combined per tensor t and candidate type τ:

* **Damage** E_t(τ): the importance-weighted squared error of t quantized to τ, Σ_rows Σ_j (ΔW_ij)² · E[x_j²],
  measured with ggml's own encoders (`native.kernels.measure_gguf`; the importance is the matrix's mean squared
  activation per input column). It is the expected squared error of the tensor's output, y = W x.
* **Gain** g_G: how much a unit of that output error moves the model's next-token distribution, measured by
  probing. The reference is loaded once with its weights in writable memory; for each group G of tensors (one
  tensor class in a band of consecutive layers, the token embedding, the output matrix) every tensor of G is
  replaced by its own round trip through a probe type, a chunk of each calibration text is evaluated, and the mean
  KL divergence from the untouched reference over every position after the first 16 is measured; then the weights
  are put back. g_G = (KLD_G − KLD_0) /
  Σ_{t∈G} E_t(probe type). A layer whose damage stands far above its band's is a group of its own
  (`probe_groups`).
* **Input rounding** I_t(τ): what llama.cpp's CPU kernels add by rounding the product's inputs to 8 bits, charged
  by formula (`native.input_rounding`) and scaled per kind of input by a probe of its own (`_input_scales`).

The predicted contribution of t at τ to the mean KLD is then g_G(t) · (E_t(τ) + I_t(τ)): damage by what it does
downstream, so a type is charged for what it costs this model on this text. KLD is quadratic in small output
perturbations and E is a squared error, so the prediction is linear in E; contributions of different tensors are
taken as additive.

Cost: the error table is one encode and decode of every weight per candidate type (on sampled rows), and the
probing is (groups + 1) evaluations of `probe_chunks` chunks, plus one per kind of input and input block. Both
grow linearly with the parameter count for a fixed number of groups; `layer_bands` sets how many groups per tensor
class (see docs/mix.md for the cost model and the cheaper settings for large models).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from converters.calibration.calibrate import CalibrationText, builtin_texts, calibration_chunks
from converters.calibration.imatrix import ImportanceMatrix
from converters.core.errors import Cancelled, UserError
from converters.core.gguf_file import check_gguf, file_fingerprint
from converters.core.hyperparameters import check_model_gguf
from converters.core.isolation import isolated
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.core.leftovers import temporary_file
from converters.quantization.plan import ggml_type, type_name

if TYPE_CHECKING:
    from native.activations import ModelEvaluator
    from native.input_rounding import RoundingStats
    from native.kernels import ErrorTable

K_AND_LEGACY_TYPES = ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16")
I_QUANT_TYPES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs", "iq4_nl")
"""llama.cpp's lattice-codebook types: blocks of 256 (IQ4_NL: 32). Most are encoded only with an importance
vector, so a weight the importance matrix has no entry for does not get them."""
WRITTEN_ONLY_WITH_IMPORTANCE = frozenset({"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s"})
"""Types llama.cpp's quantizer refuses to write for a weight its importance matrix has no entry for."""
CANDIDATE_TYPES = K_AND_LEGACY_TYPES + I_QUANT_TYPES
"""Types a tensor may get: k-quants and i-quants where rows are multiples of 256, the legacy types and IQ4_NL
where rows are multiples of 32, and F16."""
DEFAULT_PROBE_CHUNKS = 5
"""One chunk of each built-in calibration text: the gains of code and math alone are 2–5× low on other text."""
DEFAULT_PROBE_CTX = 256
PROBE_CONTEXT_TOKENS = 16
"""The first positions of a probe chunk only give context; every later one is scored (at most the second half)."""
DEFAULT_LAYER_BANDS = 4
DEFAULT_SAMPLE_ROWS = 256
OUTLIER_DAMAGE_FACTOR = 3.0
"""A layer whose damage at the probe type exceeds its band's median by this factor is probed on its own."""
INPUT_ROUNDING_CHUNKS = 8
"""Chunks (of the probe context) on which the rounding of every product's inputs is measured."""
INPUT_PROBE_AMPLITUDE = 4.0
"""The input rounding's output error is probed this many times larger (a²× the KLD, still small next to the weight
probes), so that even a kind whose rounding costs little stands out of the probe's noise."""
_WEIGHT_ROWS_PER_STEP = 16384
"""W δ is formed this many rows of W at a time: a 128k-row output matrix in float32 would be gigabytes at once."""
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
TOKEN_EMBEDDING = "token_embd.weight"
OUTPUT = "output.weight"
LOOKUP_ROLE = "@lookup"
"""Suffix of the group of a tied token embedding's lookup role (its output role keeps the group's name)."""


@dataclass(frozen=True)
class ProbeEffort:
    """How much probing a mix does: more groups and tokens cost time and make the gains finer."""

    layer_bands: int
    probe_chunks: int
    probe_ctx: int


EFFORTS = {
    "fast": ProbeEffort(layer_bands=2, probe_chunks=5, probe_ctx=128),
    "default": ProbeEffort(layer_bands=DEFAULT_LAYER_BANDS, probe_chunks=DEFAULT_PROBE_CHUNKS,
                           probe_ctx=DEFAULT_PROBE_CTX),
    "thorough": ProbeEffort(layer_bands=1 << 16, probe_chunks=5, probe_ctx=512),
}
"""`fast` for large models (14 groups for a Llama), `thorough` probes every layer on its own."""


def effort_named(name: str) -> ProbeEffort:
    try:
        return EFFORTS[name]
    except KeyError:
        raise SensitivityError(f"unknown mix effort {name!r}; use one of {', '.join(EFFORTS)}.") from None


class SensitivityError(UserError):
    """Sensitivity cannot be measured on this model as asked."""


@dataclass(frozen=True)
class TypeCost:
    type: str
    bytes: int
    damage: float
    """Importance-weighted squared error of the whole tensor at this type (0 for a lossless type)."""
    lookup_damage: float = 0.0
    """For a tied token embedding: the squared error of the rows its lookup reads (its second role); else 0."""
    input_damage: float = 0.0
    """The expected squared output error of llama.cpp's CPU kernels rounding the product's inputs to 8 bits for
    this type (`native.input_rounding`); the weights' encoding does not change it."""


@dataclass(frozen=True)
class TensorSensitivity:
    name: str
    shape: tuple[int, ...]
    source_type: str
    group: str
    gain: float
    """KLD (nats per token) per unit of damage, measured for the tensor's group."""
    options: tuple[TypeCost, ...]
    lookup_gain: float = 0.0
    """For a tied token embedding: KLD per unit of lookup damage, probed apart from its output role; else 0."""

    def predicted_kld(self, type_name: str) -> float:
        return self.predicted(self.option(type_name))

    def predicted(self, option: TypeCost) -> float:
        """The predicted contribution to the mean KLD of this tensor stored as `option`."""
        return self.gain * (option.damage + option.input_damage) + self.lookup_gain * option.lookup_damage

    def option(self, type_name: str) -> TypeCost:
        for option in self.options:
            if option.type == type_name:
                return option
        raise KeyError(f"{type_name} is not a candidate type of {self.name}")


@dataclass(frozen=True)
class ProbeText:
    """The calibration tokens the gains were probed on: `chunks` chunks of `ctx` tokens, scored from
    `first_scored` on."""

    chunks: int
    ctx: int
    first_scored: int

    @classmethod
    def of(cls, chunks: int, ctx: int) -> ProbeText:
        """`chunks` chunks of `ctx` tokens, scored as the probe scores them."""
        return cls(chunks, ctx, first_scored(ctx))


@dataclass(frozen=True)
class Sensitivity:
    tensors: tuple[TensorSensitivity, ...]
    group_kld: Mapping[str, float]
    """Measured mean KLD with each group degraded to its probe type (baseline subtracted)."""
    probe_types: Mapping[str, str]
    baseline_kld: float
    probe_tokens: int
    seconds: float
    candidate_types: tuple[str, ...] = CANDIDATE_TYPES
    """The types whose damages were measured (a tensor's options are those of them that fit it)."""
    input_scales: Mapping[str, float] | None = None
    """Measured over charged KLD of rounding the inputs, per input kind and block ("ffn_down/256"), already applied
    to every option's `input_damage`; None in a measurement remembered before they were probed."""
    probed_on: ProbeText | None = None
    """None in a measurement remembered before the probe's text was recorded."""

    def tensor(self, name: str) -> TensorSensitivity:
        for tensor in self.tensors:
            if tensor.name == name:
                return tensor
        raise KeyError(name)


def tensor_group(name: str, n_layers: int, layer_bands: int) -> str:
    """The probing group of a weight: its class within a band of layers ("ffn_down@2"), or its own name.

    The first and the last layer are probed on their own ("ffn_down@first", "ffn_down@last"): they read the raw
    embeddings and write the final hidden state, and their gains often differ from their neighbours'.
    """
    match = _LAYER_NAME.match(name)
    if match is None:
        return name.removesuffix(".weight")
    layer, role = int(match.group(1)), match.group(2).removesuffix(".weight")
    if n_layers > 2 and layer == 0:
        return f"{role}@first"
    if n_layers > 2 and layer == n_layers - 1:
        return f"{role}@last"
    inner = max(n_layers - 2, 1) if n_layers > 2 else n_layers
    position = layer - 1 if n_layers > 2 else layer
    bands = max(1, min(layer_bands, inner))
    return f"{role}@{position * bands // inner}"


def probe_type(options: Sequence[TypeCost]) -> str:
    """The type a group is probed at: a 4-bit type (k-quant where it fits), in the middle of the useful range."""
    available = {option.type for option in options}
    for name in ("q4_K", "q4_0", "q5_0", "q8_0"):
        if name in available:
            return name
    return options[0].type


def _cost(table: ErrorTable, tensor: str, measured_type: str) -> TypeCost:
    error = table.error(tensor, measured_type)
    assert error is not None
    return TypeCost(type_name(ggml_type(measured_type)), error.tensor_bytes, error.weighted_squared_error)


def _writable(table: ErrorTable, tensor: str, importance: Mapping[str, np.ndarray] | None) -> tuple[str, ...]:
    """The measured types of `tensor` that llama.cpp will write for it."""
    weighted = importance is not None and tensor in importance
    return tuple(measured for measured in table.fitting_types(tensor)
                 if weighted or type_name(ggml_type(measured)) not in WRITTEN_ONLY_WITH_IMPORTANCE)


def _plain_error(table: ErrorTable, tensor: str, measured_type: str) -> float:
    """The unweighted squared error: what a lookup of the rows sees (the importance weights products' inputs)."""
    error = table.error(tensor, measured_type)
    assert error is not None
    return error.squared_error


def _importance(matrix: ImportanceMatrix | None) -> dict[str, np.ndarray] | None:
    if matrix is None:
        return None
    return {name: entry.mean_squares().reshape(entry.n_mat, entry.n_in).squeeze(0) if entry.n_mat == 1
            else entry.mean_squares().reshape(entry.n_mat, entry.n_in)
            for name, entry in matrix.entries.items()}


def _as_float(raw: np.ndarray, source_type: str, shape: tuple[int, ...]) -> np.ndarray:
    if source_type == "f32":
        return raw.view(np.float32).reshape(-1, shape[0]).copy()
    if source_type == "f16":
        return raw.view(np.float16).astype(np.float32).reshape(-1, shape[0])
    if source_type == "bf16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(-1, shape[0])
    raise SensitivityError(f"probing needs an F32, F16 or BF16 reference, and this one stores {source_type}; "
                           "quantize from the HF checkpoint or an unquantized GGUF.")


def _stored(values: np.ndarray, source_type: str) -> np.ndarray:
    if source_type == "f32":
        return values.astype(np.float32)
    if source_type == "f16":
        return values.astype(np.float16)
    rounded = values.astype(np.float32).view(np.uint32)
    return ((rounded + 0x7FFF + ((rounded >> 16) & 1)) >> 16).astype(np.uint16)


def _round_trip(values: np.ndarray, type_name: str, importance: np.ndarray | None) -> np.ndarray:
    from native.kernels import dequantize_rows, quantize_rows

    if type_name in ("f16", "f32"):
        return values.astype(np.float16).astype(np.float32) if type_name == "f16" else values
    vector = importance if importance is None or importance.ndim == 1 else None
    encoded = quantize_rows(values, type_name, vector)
    return dequantize_rows(encoded, type_name, values.shape[0], values.shape[1])


SENSITIVITY_FORMAT = "qdesk.sensitivity/3"


def sensitivity_cache_folder() -> Path:
    """Where measured sensitivities are kept: `$QDESK_CACHE_DIR/sensitivity`, else the user cache folder."""
    from converters.core.paths import cache_dir

    return cache_dir() / "sensitivity"


def _cache_key(reference: Path, matrix: ImportanceMatrix | None, texts: Sequence[CalibrationText] | None,
               settings: tuple[object, ...]) -> str:
    import llama_cpp

    digest = hashlib.sha256()
    for part in (SENSITIVITY_FORMAT, file_fingerprint(reference), llama_cpp.__version__, repr(settings)):
        digest.update(str(part).encode() + b"\0")
    if matrix is not None:
        for name, entry in sorted(matrix.entries.items()):
            digest.update(name.encode() + entry.sums.tobytes() + entry.counts.tobytes())
    for text in texts or ():
        digest.update(text.name.encode() + "\0".join(text.documents).encode()
                      + json.dumps(text.conversations).encode())
    return digest.hexdigest()[:32]


def _to_json(sensitivity: Sensitivity) -> dict[str, object]:
    return {
        "format": SENSITIVITY_FORMAT,
        "group_kld": dict(sensitivity.group_kld),
        "probe_types": dict(sensitivity.probe_types),
        "baseline_kld": sensitivity.baseline_kld,
        "probe_tokens": sensitivity.probe_tokens,
        "seconds": sensitivity.seconds,
        "candidate_types": list(sensitivity.candidate_types),
        "input_scales": dict(sensitivity.input_scales) if sensitivity.input_scales is not None else None,
        "probed_on": asdict(sensitivity.probed_on) if sensitivity.probed_on is not None else None,
        "tensors": [{"name": t.name, "shape": list(t.shape), "source_type": t.source_type, "group": t.group,
                     "gain": t.gain, "lookup_gain": t.lookup_gain,
                     "options": [[o.type, o.bytes, o.damage, o.lookup_damage, o.input_damage] for o in t.options]}
                    for t in sensitivity.tensors],
    }


def _from_json(document: dict[str, Any]) -> Sensitivity:
    tensors = tuple(TensorSensitivity(t["name"], tuple(t["shape"]), t["source_type"], t["group"], float(t["gain"]),
                                      tuple(TypeCost(str(o[0]), int(o[1]), float(o[2]), float(o[3]), float(o[4]))
                                            for o in t["options"]), float(t["lookup_gain"]))
                    for t in document["tensors"])
    measured = document.get("candidate_types") or K_AND_LEGACY_TYPES  # measurements saved before i-quants
    scales = document.get("input_scales")
    probed_on = document.get("probed_on")
    return Sensitivity(tensors, document["group_kld"], document["probe_types"], float(document["baseline_kld"]),
                       int(document["probe_tokens"]), float(document["seconds"]), tuple(str(t) for t in measured),
                       {str(kind): float(scale) for kind, scale in scales.items()} if scales is not None else None,
                       ProbeText(**{key: int(value) for key, value in probed_on.items()}) if probed_on else None)


def cached_sensitivity(reference: str | Path, matrix: ImportanceMatrix | None,
                       texts: Sequence[CalibrationText] | None = None, **settings: Any) -> Sensitivity:
    """`measure_sensitivity`, remembered: a second mix of the same reference, matrix, text and settings (another
    budget, say) reuses the measurement. `progress` and `cancel` are passed on and are not part of the key.

    The damages are kept apart from how they were probed: a measurement of the same damages probed otherwise
    (other probe text or layer bands, or remembered before the groups or the probe's text were today's) keeps its
    damages and is probed again (`reprobed`), and each probing is remembered on its own. The candidate types are not
    part of the key either: a remembered measurement that lacks some of them has only their damages measured
    (`with_types`)."""
    reference = Path(reference)
    check_gguf(reference)
    progress = settings.pop("progress", no_progress)
    cancel = settings.pop("cancel", None)
    candidate_types = tuple(settings.pop("candidate_types", CANDIDATE_TYPES))
    probe_chunks = settings.pop("probe_chunks", DEFAULT_PROBE_CHUNKS)
    probe_ctx = settings.pop("probe_ctx", DEFAULT_PROBE_CTX)
    layer_bands = settings.pop("layer_bands", DEFAULT_LAYER_BANDS)
    wanted = ProbeText.of(probe_chunks, probe_ctx)
    damages_key = _cache_key(reference, matrix, texts, tuple(sorted(settings.items())))
    folder = sensitivity_cache_folder()
    path = folder / f"{damages_key}-b{layer_bands}-{probe_chunks}x{probe_ctx}-s{wanted.first_scored}.json"
    remembered = _read_cached(path)
    sensitivity = remembered or _probed_otherwise(folder, damages_key)
    if sensitivity is None:
        sensitivity = measure_sensitivity(reference, matrix, texts, progress=progress, cancel=cancel,
                                          candidate_types=candidate_types, probe_chunks=probe_chunks,
                                          probe_ctx=probe_ctx, layer_bands=layer_bands, **settings)
    elif not set(candidate_types) <= set(sensitivity.candidate_types):
        sensitivity = with_types(sensitivity, reference, matrix, candidate_types,
                                 sample_rows=settings.get("sample_rows", DEFAULT_SAMPLE_ROWS),
                                 threads=settings.get("threads"), progress=progress, cancel=cancel)
    if sensitivity.probed_on != wanted or not _grouped_as_now(sensitivity, layer_bands):
        sensitivity = reprobed(sensitivity, reference, matrix, texts, probe_chunks=probe_chunks, probe_ctx=probe_ctx,
                               layer_bands=layer_bands, threads=settings.get("threads"),
                               gpu_layers=settings.get("gpu_layers", 0), progress=progress, cancel=cancel)
    if sensitivity == remembered:
        return sensitivity
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        temporary = temporary_file(folder, path.name)
        try:
            temporary.write_text(json.dumps(_to_json(sensitivity)), encoding="utf-8")
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    return sensitivity


def _probed_otherwise(folder: Path, damages_key: str) -> Sensitivity | None:
    """The most recent remembered measurement of the same damages, whatever it was probed on."""
    with contextlib.suppress(OSError):
        for path in sorted(folder.glob(f"{damages_key}-*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
            sensitivity = _read_cached(path)
            if sensitivity is not None:
                return sensitivity
    return None


def _grouped_as_now(sensitivity: Sensitivity, layer_bands: int) -> bool:
    groups = probe_groups({t.name: t.options for t in sensitivity.tensors}, layer_bands)
    now = {name: group for group, names in groups.items() for name in names}
    return all(now[t.name] == t.group for t in sensitivity.tensors)


def _read_cached(path: Path) -> Sensitivity | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") == SENSITIVITY_FORMAT:
            return _from_json(document)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    return None


@isolated("measuring the error of more types")
def with_types(
    sensitivity: Sensitivity,
    reference: str | Path,
    matrix: ImportanceMatrix | None,
    candidate_types: Sequence[str],
    *,
    sample_rows: int | None = DEFAULT_SAMPLE_ROWS,
    threads: int | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> Sensitivity:
    """`sensitivity` with the damages of the `candidate_types` it lacks measured and added to every tensor they
    fit. The gains stay: they were probed at each group's probe type, which a new candidate does not change. A
    new type's input rounding is that of a measured type whose kernel rounds inputs in the same blocks."""
    from native.errors import Stopped
    from native.input_rounding import INPUT_BLOCK_OF_TYPE
    from native.kernels import measure_gguf

    known = {type_name(ggml_type(name)) for name in sensitivity.candidate_types}
    missing = [name for name in candidate_types if type_name(ggml_type(name)) not in known]
    if not missing:
        return sensitivity
    started = time.monotonic()
    reference = Path(reference)
    importance = _importance(matrix)

    def measuring(done: int, total: int) -> None:
        progress(Progress(done, total, "measurements", "measuring quantization error"))

    try:
        table = measure_gguf(reference, missing, importance, sample_rows=sample_rows,
                             tensors=[tensor.name for tensor in sensitivity.tensors], threads=threads,
                             progress=measuring, should_stop=(lambda: cancel.cancelled) if cancel else None,
                             skip_needing_importance=True)
    except Stopped:
        raise Cancelled("the sensitivity measurement was cancelled") from None
    except ValueError as error:
        raise SensitivityError(str(error)) from error
    tensors = []
    for tensor in sensitivity.tensors:
        input_damage = {INPUT_BLOCK_OF_TYPE.get(option.type): option.input_damage for option in tensor.options}
        tied = any(option.lookup_damage > 0 for option in tensor.options)
        added = tuple(replace(_cost(table, tensor.name, measured),
                              input_damage=input_damage.get(INPUT_BLOCK_OF_TYPE.get(type_name(ggml_type(measured))),
                                                            0.0),
                              lookup_damage=_plain_error(table, tensor.name, measured) if tied else 0.0)
                      for measured in _writable(table, tensor.name, importance))
        tensors.append(replace(tensor, options=tensor.options + added))
    return replace(sensitivity, tensors=tuple(tensors),
                   candidate_types=sensitivity.candidate_types + tuple(type_name(ggml_type(name)) for name in missing),
                   seconds=sensitivity.seconds + time.monotonic() - started)


@isolated("the sensitivity measurement")
def measure_sensitivity(
    reference: str | Path,
    matrix: ImportanceMatrix | None,
    texts: Sequence[CalibrationText] | None = None,
    *,
    candidate_types: Sequence[str] = CANDIDATE_TYPES,
    probe_chunks: int = DEFAULT_PROBE_CHUNKS,
    probe_ctx: int = DEFAULT_PROBE_CTX,
    layer_bands: int = DEFAULT_LAYER_BANDS,
    sample_rows: int | None = DEFAULT_SAMPLE_ROWS,
    threads: int | None = None,
    gpu_layers: int = 0,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> Sensitivity:
    """Measure the damage of every candidate type on every weight of `reference` and the gain of every group."""
    from native.errors import Stopped
    from native.kernels import measure_gguf, quantizable_weight

    started = time.monotonic()
    reference = Path(reference)
    header = check_model_gguf(reference)
    weights = {t.name: t for t in header.tensors if quantizable_weight(t.name, len(t.shape))}
    importance = _importance(matrix)
    should_stop = (lambda: cancel.cancelled) if cancel is not None else None

    def measuring(done: int, total: int) -> None:
        progress(Progress(done, total, "measurements", "measuring quantization error"))

    try:
        table = measure_gguf(reference, list(candidate_types), importance, sample_rows=sample_rows,
                             tensors=list(weights), threads=threads, progress=measuring, should_stop=should_stop,
                             skip_needing_importance=True)
    except Stopped:
        raise Cancelled("the sensitivity measurement was cancelled") from None
    except ValueError as error:
        raise SensitivityError(str(error)) from error

    options = {name: tuple(_cost(table, name, measured) for measured in _writable(table, name, importance))
               for name in weights}
    if TOKEN_EMBEDDING in weights and OUTPUT not in {t.name for t in header.tensors}:
        options[TOKEN_EMBEDDING] = tuple(
            replace(option, lookup_damage=_plain_error(table, TOKEN_EMBEDDING, option.type))
            for option in options[TOKEN_EMBEDDING])
    sensitivity = _probed(reference, options, importance, texts, probe_chunks=probe_chunks, probe_ctx=probe_ctx,
                          layer_bands=layer_bands, threads=threads, gpu_layers=gpu_layers, progress=progress,
                          cancel=cancel)
    return replace(sensitivity, seconds=time.monotonic() - started,
                   candidate_types=tuple(type_name(ggml_type(name)) for name in candidate_types))


@isolated("probing the sensitivity again")
def reprobed(
    sensitivity: Sensitivity,
    reference: str | Path,
    matrix: ImportanceMatrix | None,
    texts: Sequence[CalibrationText] | None = None,
    *,
    probe_chunks: int = DEFAULT_PROBE_CHUNKS,
    probe_ctx: int = DEFAULT_PROBE_CTX,
    layer_bands: int = DEFAULT_LAYER_BANDS,
    threads: int | None = None,
    gpu_layers: int = 0,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> Sensitivity:
    """`sensitivity`'s damages with every gain and input scale probed anew (other probe settings or grouping)."""
    options = {tensor.name: tuple(replace(option, input_damage=0.0) for option in tensor.options)
               for tensor in sensitivity.tensors}
    probed = _probed(Path(reference), options, _importance(matrix), texts, probe_chunks=probe_chunks,
                     probe_ctx=probe_ctx, layer_bands=layer_bands, threads=threads, gpu_layers=gpu_layers,
                     progress=progress, cancel=cancel)
    return replace(probed, seconds=sensitivity.seconds + probed.seconds, candidate_types=sensitivity.candidate_types)


def probe_groups(weights: Mapping[str, Sequence[TypeCost]], layer_bands: int) -> dict[str, list[str]]:
    """The groups probed together: a tensor class in a band of layers (`tensor_group`; the layers are counted from
    the weights' names), with a layer whose damage at the probe type is more than `OUTLIER_DAMAGE_FACTOR` times its
    band's median probed on its own, so that one outlier's damage does not set the gain of its neighbours."""
    blocks = {int(m.group(1)) for name in weights if (m := _LAYER_NAME.match(name))}
    n_layers = max(blocks) + 1 if blocks else 0
    banded: dict[str, list[str]] = {}
    for name in weights:
        banded.setdefault(tensor_group(name, n_layers, layer_bands), []).append(name)
    groups: dict[str, list[str]] = {}
    for group, names in banded.items():
        probe = probe_type(weights[names[0]])
        damage = {name: next(o.damage for o in weights[name] if o.type == probe) for name in names}
        median = float(np.median(list(damage.values())))
        outliers = [name for name in names if len(names) > 2 and damage[name] > OUTLIER_DAMAGE_FACTOR * median]
        groups[group] = [name for name in names if name not in outliers]
        for name in outliers:
            match = _LAYER_NAME.match(name)
            assert match is not None
            groups[f"{group.split('@')[0]}@layer{match.group(1)}"] = [name]
    return groups


def _probed(
    reference: Path,
    options: dict[str, tuple[TypeCost, ...]],
    importance: Mapping[str, np.ndarray] | None,
    texts: Sequence[CalibrationText] | None,
    *,
    probe_chunks: int,
    probe_ctx: int,
    layer_bands: int,
    threads: int | None,
    gpu_layers: int,
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> Sensitivity:
    """The gain of every group and the input scales, probed, for weights whose damages are `options`."""
    from native.activations import ModelEvaluator
    from native.errors import NativeError, Stopped

    started = time.monotonic()
    header = check_model_gguf(reference)
    weights = {t.name: t for t in header.tensors if t.name in options}
    should_stop = (lambda: cancel.cancelled) if cancel is not None else None
    groups = probe_groups(options, layer_bands)
    probes = {group: probe_type(options[names[0]]) for group, names in groups.items()}

    tied = TOKEN_EMBEDDING in weights and OUTPUT not in {t.name for t in header.tensors}
    group_kld: dict[str, float] = {}
    column_squares: dict[str, np.ndarray] = {}
    try:
        rounding = _input_rounding(reference, texts, probe_ctx, max(probe_chunks, INPUT_ROUNDING_CHUNKS),
                                   threads, gpu_layers, should_stop)
        with ModelEvaluator(reference, n_ctx=probe_ctx, n_gpu_layers=gpu_layers, n_threads=threads, collect=False,
                            should_stop=should_stop, editable_weights=True) as evaluator:
            probe = _Probe.open(evaluator, texts, probe_ctx, probe_chunks)
            missing = [name for name in weights if name not in evaluator.weight_names()]
            if missing:
                raise SensitivityError(f"llama.cpp's graph does not read {missing[0]} as a weight, so it cannot be "
                                       "probed; this architecture is not supported by the sensitivity mix yet.")
            for index, (group, names) in enumerate(sorted(groups.items())):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                progress(Progress(index, len(groups), "groups", f"probing {group}"))
                originals = {name: evaluator.read_weight(name) for name in names}
                try:
                    degraded: dict[str, np.ndarray] = {}
                    for name in names:
                        source_type = evaluator.weight_type(name)
                        values = _as_float(originals[name], source_type, weights[name].shape)
                        column_squares[name] = np.square(values, dtype=np.float64).sum(axis=0)
                        vector = importance.get(name) if importance is not None else None
                        degraded[name] = _round_trip(values, probes[group], vector)
                        evaluator.write_weight(name, _stored(degraded[name], source_type))
                    if tied and names == [TOKEN_EMBEDDING]:
                        group_kld.update(_tied_roles(group, evaluator, originals[TOKEN_EMBEDDING],
                                                     degraded[TOKEN_EMBEDDING], weights[TOKEN_EMBEDDING].shape,
                                                     probe.mean_kld, probe.baseline))
                    else:
                        group_kld[group] = max(probe.mean_kld() - probe.baseline, 0.0)
                finally:
                    for name, raw in originals.items():
                        evaluator.write_weight(name, raw)
            progress(Progress(len(groups), len(groups), "groups", "probing done"))

            for name in weights:
                if name in rounding and name in column_squares:
                    options[name] = tuple(replace(option, input_damage=_input_damage(option.type, column_squares[name],
                                                                                    rounding[name]))
                                          for option in options[name])
            tensors = []
            for group, names in sorted(groups.items()):
                probed = [next(o for o in options[name] if o.type == probes[group]) for name in names]
                damage = sum(option.damage for option in probed)
                gain = group_kld[group] / damage if damage > 0 else 0.0
                lookup_damage = sum(option.lookup_damage for option in probed)
                lookup_gain = group_kld.get(group + LOOKUP_ROLE, 0.0) / lookup_damage if lookup_damage > 0 else 0.0
                for name in names:
                    tensor = weights[name]
                    tensors.append(TensorSensitivity(name, tuple(tensor.shape), tensor.type.name.lower(), group,
                                                     gain, options[name], lookup_gain))
            order = {name: index for index, name in enumerate(weights)}
            tensors.sort(key=lambda t: order[t.name])
            scales = _input_scales(probe, tensors, progress, cancel)
    except Stopped:
        raise Cancelled("the sensitivity measurement was cancelled") from None
    except NativeError as error:
        raise SensitivityError(str(error)) from error

    return Sensitivity(_with_input_scales(tensors, scales), group_kld, probes, probe.baseline, probe.tokens,
                       time.monotonic() - started, input_scales=scales,
                       probed_on=ProbeText.of(probe_chunks, probe_ctx))


def first_scored(ctx: int) -> int:
    """The first scored position of a probe chunk of `ctx` tokens."""
    return min(PROBE_CONTEXT_TOKENS, ctx // 2)


class _Probe:
    """The probe text's chunks evaluated once by the untouched reference: mean KLD from it, whatever changed since."""

    def __init__(self, evaluator: ModelEvaluator, chunks: list[list[int]], first: int) -> None:
        from converters.calibration.divergence import encode_reference

        self.evaluator = evaluator
        self._chunks = chunks
        self._first = first
        self._references = [encode_reference(self.logits(chunk), np.asarray(chunk[first + 1 :])) for chunk in chunks]
        self.tokens = sum(len(chunk) - 1 - first for chunk in chunks)
        self.baseline = self.mean_kld()

    @classmethod
    def open(cls, evaluator: ModelEvaluator, texts: Sequence[CalibrationText] | None, ctx: int, chunks: int
             ) -> _Probe:
        return cls(evaluator, calibration_chunks(evaluator, list(texts) if texts else builtin_texts(), ctx, chunks),
                   first_scored(ctx))

    def logits(self, chunk: list[int], table: np.ndarray | None = None) -> np.ndarray:
        rows: list[np.ndarray] = []
        keep = lambda _p, logits: rows.append(logits.copy())  # noqa: E731
        if table is None:
            self.evaluator.evaluate_logits(chunk, self._first, keep)
        else:
            self.evaluator.evaluate_embedding_logits(table[np.asarray(chunk)], self._first, keep)
        return np.concatenate(rows)[: len(chunk) - 1 - self._first]

    def mean_kld(self, table: np.ndarray | None = None, length: int | None = None) -> float:
        """Mean KLD from the reference; with `table`, the input rows are looked up there, not in the model's own
        token embedding; with `length`, over each chunk's first `length` tokens only (the model is causal, so
        those positions score as they do in the whole chunk, at a fraction of the evaluation)."""
        from converters.calibration.divergence import compare_candidate

        total, count = 0.0, 0
        for chunk, reference_rows in zip(self._chunks, self._references, strict=True):
            head = chunk[:length] if length is not None else chunk
            scored_rows = len(head) - 1 - self._first
            if scored_rows <= 0:
                continue
            scored = compare_candidate(self.logits(head, table), reference_rows.window(slice(0, scored_rows)),
                                       np.asarray(head[self._first + 1 :]))
            total += float(scored.kld.sum())
            count += scored.kld.size
        return total / count

    def head_length(self) -> int:
        """The chunk length the input-rounding probes score: the first half of each chunk (at least its context
        and as many scored positions)."""
        longest = max(len(chunk) for chunk in self._chunks)
        return min(longest, max(longest // 2, 2 * self._first + 2))


def input_kind(name: str) -> str:
    """What a weight's input is, for the input-rounding probe: its class in a layer ("ffn_down"), else its name."""
    match = _LAYER_NAME.match(name)
    return (match.group(2) if match else name).removesuffix(".weight")


def _input_scales(probe: _Probe, tensors: Sequence[TensorSensitivity], progress: ProgressFn,
                  cancel: CancelToken | None) -> dict[str, float]:
    """Measured over charged KLD of the inputs' rounding, per input kind and block ("attn_output/256").

    The charge g · Σ_j ‖W_:,j‖² E[δ_j²] values an output error W δ as the group's weight errors are valued; but W δ
    points where W's heavy columns write, which the rest of the model may weigh differently. So for each kind and
    block, every product of the kind's weights gets INPUT_PROBE_AMPLITUDE · W δ added (δ: its inputs' rounding
    as the CPU kernel makes it) in an evaluation of the first half of each probe chunk (amplified, the error stands
    out of the noise on half the tokens, for half the time), and the KLD it causes is compared with the charge. A
    kind whose charge is zero keeps a scale of 1."""
    from native.input_rounding import INPUT_BLOCK_OF_TYPE, INPUT_BLOCKS, rounded_rows

    evaluator = probe.evaluator
    charged: dict[tuple[str, int], dict[str, float]] = {}
    for tensor in tensors:
        for option in tensor.options:
            block = INPUT_BLOCK_OF_TYPE.get(option.type)
            if block is not None and option.input_damage > 0:
                charge = tensor.gain * option.input_damage
                charged.setdefault((input_kind(tensor.name), block), {})[tensor.name] = charge
    shapes = {tensor.name: tensor.shape for tensor in tensors}
    amplitude = np.float32(INPUT_PROBE_AMPLITUDE)
    scales: dict[str, float] = {}
    probes = sorted(charged, key=lambda kind_block: (kind_block[0], INPUT_BLOCKS.index(kind_block[1])))
    length = probe.head_length()
    baseline = probe.mean_kld(length=length) if probes else probe.baseline  # the untouched model, same positions
    for index, (kind, block) in enumerate(probes):
        if cancel is not None:
            cancel.raise_if_cancelled()
        progress(Progress(index, len(probes), "input kinds", f"probing the rounding of {kind}'s inputs ({block})"))

        def add_rounding(name: str, rows: np.ndarray, output: np.ndarray, block: int = block) -> None:
            delta = amplitude * (rounded_rows(rows, block) - rows)
            raw, source_type, n_in = evaluator.read_weight(name), evaluator.weight_type(name), shapes[name][0]
            row_bytes = raw.size // output.shape[1]
            for start in range(0, output.shape[1], _WEIGHT_ROWS_PER_STEP):
                stop = min(start + _WEIGHT_ROWS_PER_STEP, output.shape[1])
                weight = _as_float(raw[start * row_bytes : stop * row_bytes], source_type, (n_in,))
                output[:, start:stop] += delta @ weight.T

        with evaluator.adjusting_products(charged[kind, block], add_rounding):
            measured = max(probe.mean_kld(length=length) - baseline, 0.0) / float(amplitude) ** 2
        charge = sum(charged[kind, block].values())
        scales[f"{kind}/{block}"] = measured / charge if charge > 0 else 1.0
    progress(Progress(len(probes), len(probes), "input kinds", "probing done"))
    return scales


def _with_input_scales(tensors: Sequence[TensorSensitivity], scales: Mapping[str, float]
                       ) -> tuple[TensorSensitivity, ...]:
    from native.input_rounding import INPUT_BLOCK_OF_TYPE

    def scaled(tensor: TensorSensitivity, option: TypeCost) -> TypeCost:
        block = INPUT_BLOCK_OF_TYPE.get(option.type)
        scale = scales.get(f"{input_kind(tensor.name)}/{block}", 1.0)
        return replace(option, input_damage=option.input_damage * scale) if option.input_damage else option

    return tuple(replace(tensor, options=tuple(scaled(tensor, option) for option in tensor.options))
                 for tensor in tensors)


def _input_rounding(reference: Path, texts: Sequence[CalibrationText] | None, ctx: int, chunks: int,
                    threads: int | None, gpu_layers: int, should_stop: Callable[[], bool] | None
                    ) -> dict[str, RoundingStats]:
    """How much rounding each weight's inputs to 8 bits perturbs them, per input column, on calibration text."""
    from native.activations import FINAL_NORM_INPUT, ModelEvaluator
    from native.input_rounding import InputRounding

    observer = InputRounding()
    with ModelEvaluator(reference, n_ctx=ctx, n_gpu_layers=gpu_layers, n_threads=threads, should_stop=should_stop,
                        input_observer=observer) as evaluator:
        for chunk in calibration_chunks(evaluator, list(texts) if texts else builtin_texts(), ctx, chunks):
            evaluator.evaluate_chunk(chunk)
        output = evaluator.output_weight
    return observer.stats({FINAL_NORM_INPUT: output} if output is not None else {})


def _input_damage(type_name: str, column_squares: np.ndarray, rounding: RoundingStats) -> float:
    """Σ_j ‖W_:,j‖² E[δ_j²]: the output error of the rounding of the inputs that `type_name`'s CPU kernel makes."""
    from native.input_rounding import INPUT_BLOCK_OF_TYPE

    block = INPUT_BLOCK_OF_TYPE.get(type_name)
    if block is None or column_squares.size % block:
        return 0.0
    return float(column_squares @ rounding.of_block(block))


def _tied_roles(group: str, evaluator: ModelEvaluator, original: np.ndarray, degraded: np.ndarray,
                shape: tuple[int, ...], mean_kld: Callable[[np.ndarray | None], float], baseline: float
                ) -> dict[str, float]:
    """The two roles of a tied token embedding probed apart: its output product with the probe type in the
    weights and the original rows as inputs, then its lookup with the original weights and probed rows as inputs.
    (The lookup is bypassed by giving llama.cpp the input embeddings; with the original rows it reproduces the
    reference exactly.)"""
    source_type = evaluator.weight_type(TOKEN_EMBEDDING)
    table = _as_float(original, source_type, shape)
    output_role = max(mean_kld(table) - baseline, 0.0)
    evaluator.write_weight(TOKEN_EMBEDDING, original)
    stored = np.ascontiguousarray(_stored(degraded, source_type)).reshape(-1).view(np.uint8)
    lookup_role = max(mean_kld(_as_float(stored, source_type, shape)) - baseline, 0.0)
    return {group: output_role, group + LOOKUP_ROLE: lookup_role}
