"""Quantize a model: an HF checkpoint or a GGUF in, a llama.cpp preset or a per-tensor plan applied, a GGUF out.

`quantize(source, output, plan_or_preset, imatrix, progress, cancel)` is the function the CLI and the
GUI call. The work itself is llama.cpp's quantizer (`native.quantizer`); this module chooses what it
is given: the reference GGUF (converting an HF folder on the fly), the importance matrix (computed on
the built-in calibration text for "auto", read from a file, or none) and, for a plan, an exact type
override for every tensor. The output is written to a temporary file, checked tensor for tensor
against what was asked, and renamed into place only then.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from gguf import GGMLQuantizationType

from converters.calibration.calibrate import DEFAULT_CHUNKS, DEFAULT_CTX, CalibrationText, calibrate
from converters.calibration.imatrix import ImportanceMatrix, check_matches_model, read_imatrix
from converters.core.atomic import atomic_output, check_free_space
from converters.core.errors import Cancelled, UserError
from converters.core.gguf_file import GGUFHeader, check_gguf
from converters.core.hyperparameters import check_model_gguf
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.core.leftovers import temporary_folder
from converters.core.outputs import check_output_folder, check_outputs, disk_full
from converters.mix.allocate import MIX_BASE_PRESET, MixBudget, MixPlan, check_budget, plan_mix
from converters.mix.feedback import ENCODERS, FEEDBACK_CHUNKS, CalibrationInputs, apply_feedback, feedback_sensitivity
from converters.mix.report import save_plan
from converters.mix.sensitivity import ProbeEffort, cached_sensitivity, effort_named
from converters.quantization.awq import awq_reference
from converters.quantization.plan import PlannedTensor, QuantPlan, type_name
from converters.quantization.presets import Preset, preset_named

ImatrixChoice = ImportanceMatrix | str | Path | None
"""An importance matrix, a path to one, "auto" (calibrate on the built-in text) or "none"/None."""

_T = TypeVar("_T")

AUTO = "auto"
NONE = "none"
_UNQUANTIZED = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
_UNQUANTIZED_PRESETS = {"F16"}
_FALLBACK_SUMMARY = re.compile(r"(?P<count>\d+) of (?P<total>\d+) tensor\(s\) required fallback")
ENCODER_METADATA = {"ggml": "ggml", "feedback": "error-feedback/2"}
"""`qdesk.encoder` in the written file."""
_TYPE_SUFFIX = re.compile(r"-(F32|F16|BF16|Q\d\w*|IQ\d\w*|TQ\d\w*)$", re.IGNORECASE)


class QuantizeError(UserError):
    """A quantization that cannot be done as asked."""


@dataclass(frozen=True)
class ImatrixUse:
    """Which importance matrix went into a quantization."""

    origin: str
    """"auto" (computed on the built-in text), "calibrated on TEXT", or the file it was read from."""
    datasets: tuple[str, ...]
    entries: int
    chunks: int


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    bytes: int
    plan: QuantPlan
    preset: str | None
    imatrix: ImatrixUse | None
    warnings: tuple[str, ...]
    seconds: float


def quantize(
    source: str | Path,
    output: str | Path | None = None,
    plan_or_preset: QuantPlan | MixBudget | str = "Q4_K_M",
    imatrix: ImatrixChoice = AUTO,
    *,
    texts: Sequence[CalibrationText] | None = None,
    chunks: int = DEFAULT_CHUNKS,
    ctx: int = DEFAULT_CTX,
    gpu_layers: int = 0,
    threads: int = 0,
    plan_out: str | Path | None = None,
    mix_effort: str = "default",
    encoder: str | None = None,
    awq: bool = False,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> QuantizeResult:
    """Quantize `source` (an HF checkpoint folder or a GGUF) with a preset name, a `QuantPlan`, or a `MixBudget`
    (a sensitivity-based mix within that budget; see converters/mix/allocate.py).

    `encoder` "ggml" rounds as llama.cpp does; "feedback" re-encodes the weights with error feedback
    (converters/mix/feedback.py), whatever the model's size: the calibration inputs are spilled to a scratch folder
    beside the output and removed however the job ends. The default is "feedback" for a mix, the plan's own
    encoder for a plan, and "ggml" for a preset.

    `awq` scales each weight matrix's input channels by their activations before rounding and folds the inverse
    into what produces them (converters/quantization/awq.py): the reference, its importance matrix and everything
    after them are then the scaled model's. It needs an importance matrix.
    """
    started = time.monotonic()
    cancel = cancel or CancelToken()
    plan: QuantPlan | None
    preset: Preset | None
    budget = plan_or_preset if isinstance(plan_or_preset, MixBudget) else None
    mix: MixPlan | None = None
    if budget is not None:
        plan, preset = None, None
        base = preset_named(MIX_BASE_PRESET)
        if budget.like is not None:
            preset_named(budget.like)
        effort = effort_named(mix_effort)
    elif isinstance(plan_or_preset, QuantPlan):
        plan, preset = plan_or_preset, None
        base = preset_named(plan.base)
    else:
        plan, preset = None, preset_named(plan_or_preset)
        base = preset
    warnings: list[str] = []
    input_files = _input_files(Path(source), imatrix)
    _check_outputs_first(Path(source), output, plan_out, input_files, base.name if budget is None else "mix")

    scratch = Path(output).parent if output is not None else None
    with _reference_gguf(Path(source), scratch, progress, cancel) as (reference, default_output), ExitStack() as stack:
        header = check_model_gguf(reference)
        requantize = already_quantized(header)
        if requantize and base.name not in _UNQUANTIZED_PRESETS:
            warnings.append(f"{reference.name} is already quantized ({requantize}); quantizing it again loses "
                            "quality, so start from an F16/BF16 GGUF or the HF checkpoint when you can.")
        if plan is not None:
            plan.check_model(((t.name, t.shape) for t in header.tensors), reference.name)
        if budget is not None and budget.like is None:
            check_budget(budget, reference, header)  # before the importance matrix: a budget out of reach is quick
        chosen_encoder = _chosen_encoder(encoder, budget, plan)
        target = Path(output) if output is not None else default_output.with_name(
            variant_file_name(default_output, base.name if budget is None else "mix"))
        calibration = _Calibration(texts, chunks, ctx, gpu_layers)
        extra_metadata: dict[str, str | int | float] = {}
        if awq:
            matrix, use = _importance_matrix(imatrix, base, reference, header, calibration, None, progress, cancel)
            if matrix is None:
                raise QuantizeError("--awq needs an importance matrix: its scales come from the activations one "
                                    "records; use --imatrix auto or --imatrix FILE.")
            scaled = stack.enter_context(awq_reference(reference, matrix, _awq_types(reference, base, plan, budget,
                                                                                      matrix),
                                                       target.parent, progress=progress, cancel=cancel))
            reference, matrix, header = scaled.path, scaled.matrix, check_model_gguf(scaled.path)
            extra_metadata.update(scaled.metadata())
        inputs = None
        if chosen_encoder == "feedback":
            inputs = stack.enter_context(CalibrationInputs(reference, texts, chunks=min(chunks, FEEDBACK_CHUNKS),
                                                           ctx=ctx, gpu_layers=gpu_layers, scratch=target.parent))
        if not awq:
            matrix, use = _importance_matrix(imatrix, base, reference, header, calibration, inputs, progress, cancel)
        if base.requires_imatrix and matrix is None:
            raise QuantizeError(f"{base.name} needs an importance matrix; use --imatrix auto or --imatrix FILE.")
        like_bytes = _like_bytes(budget, reference, header, matrix)
        if budget is not None:
            mix = _mix_plan(reference, header, budget, like_bytes, matrix, texts, gpu_layers, effort, inputs,
                            progress, cancel)
            plan = mix.plan

        check_outputs([*input_files, reference], [target, plan_out])
        check_free_space(target, plan.n_bytes if plan is not None else reference.stat().st_size)
        cancel.raise_if_cancelled()
        with atomic_output(target) as temporary:
            try:
                records = _run(reference, temporary, base, plan, matrix, use, requantize is not None, threads,
                               progress, cancel, {**(mix.metadata() if mix is not None else {}), **extra_metadata,
                                                  "qdesk.encoder": ENCODER_METADATA[chosen_encoder]})
            except QuantizeError as error:
                raise disk_full(target) or error from error
            if inputs is not None:
                apply_feedback(reference, temporary, inputs, matrix, threads=threads or None, progress=progress,
                               cancel=cancel)
            written = check_gguf(temporary)
            result_plan = _plan_from_header(written, reference_header=header, base=base.name,
                                            label=plan.label if plan is not None else f"preset {base.name}")
            if plan is not None and result_plan.types() != plan.types():
                raise QuantizeError(_mismatch_sentence(plan, result_plan))
            if mix is not None:
                result_plan = mix.plan
            result_plan = replace(result_plan, encoder=chosen_encoder)
            warnings.extend(records)
    if plan_out is not None:
        save_plan(result_plan, plan_out)
    return QuantizeResult(target, target.stat().st_size, result_plan, preset.name if preset else None, use,
                          tuple(warnings), time.monotonic() - started)


def _awq_types(reference: Path, base: Preset, plan: QuantPlan | None, budget: MixBudget | None,
               matrix: ImportanceMatrix) -> dict[str, str]:
    """The types activation-aware scales are searched for: the plan's, the preset's, or for a mix the preset it
    is like (Q4_K_M's for a size or bits-per-weight budget)."""
    if plan is not None:
        return plan.types()
    if budget is not None:
        return preset_plan(reference, budget.like or MIX_BASE_PRESET, matrix).types()
    return preset_plan(reference, base.name, matrix).types()


def _input_files(source: Path, imatrix: ImatrixChoice) -> list[Path]:
    """What the quantization reads from the user's disk: the GGUF or the checkpoint's files, and an imatrix file."""
    from converters.reading.checkpoint import checkpoint_files

    files = [source, *checkpoint_files(source)] if source.is_dir() else [source]
    if isinstance(imatrix, str | Path) and str(imatrix).lower() not in (AUTO, NONE):
        files.append(Path(imatrix))
    return files


def _check_outputs_first(source: Path, output: str | Path | None, plan_out: str | Path | None, inputs: list[Path],
                         type_label: str) -> None:
    """Before any work: the output (as given, or its default name) and the plan file go into folders that take
    files, and neither is an input nor the other (a missing source is reported by the reading that follows)."""
    if not source.exists():
        return
    target = Path(output) if output is not None else (
        source / "model.gguf" if source.is_dir() else source.with_name(variant_file_name(source, type_label)))
    check_output_folder(target)
    if plan_out is not None:
        check_output_folder(Path(plan_out))
    check_outputs(inputs, [target if output is not None or not source.is_dir() else None, plan_out])


def _chosen_encoder(asked: str | None, budget: MixBudget | None, plan: QuantPlan | None) -> str:
    if asked is not None:
        if asked not in ENCODERS:
            raise QuantizeError(f"there is no encoder {asked!r}; choose one of {', '.join(ENCODERS)}.")
        return asked
    if budget is not None:
        return "feedback"
    return plan.encoder if plan is not None else "ggml"


def preset_plan(source: str | Path, preset: str, imatrix: ImportanceMatrix | None = None) -> QuantPlan:
    """The plan llama.cpp's quantizer would follow for `preset` on the GGUF `source` (a dry run; writes nothing)."""
    from native.quantizer import QuantizeRequest, run_quantizer

    source = Path(source)
    header = check_model_gguf(source)
    base = preset_named(preset)
    request = QuantizeRequest(str(source), str(source.with_suffix(".dry-run")), base.ftype, dry_run=True,
                              imatrix=matrix_data(imatrix), allow_requantize=already_quantized(header) is not None)
    report = _native(lambda: run_quantizer(request))
    chosen = {record.name: record.target_type for record in report.tensors}
    tensors = tuple(PlannedTensor(t.name, t.shape, type_name(t.type), chosen.get(t.name, type_name(t.type)))
                    for t in header.tensors)
    return QuantPlan(tensors, base.name, f"preset {base.name}")


def matrix_data(matrix: ImportanceMatrix | None) -> dict[str, object] | None:
    return matrix.quantizer_data() if matrix is not None else None


@dataclass(frozen=True)
class _Calibration:
    """How to calibrate when the importance matrix is "auto"."""

    texts: Sequence[CalibrationText] | None
    chunks: int
    ctx: int
    gpu_layers: int


@contextmanager
def _reference_gguf(
    source: Path, scratch: Path | None, progress: ProgressFn, cancel: CancelToken
) -> Iterator[tuple[Path, Path]]:
    """(reference GGUF, default output path): the GGUF itself, or an HF folder converted into a temporary file
    under `scratch` (the output's folder; the checkpoint folder by default)."""
    if not source.is_dir():
        yield source, source
        return
    from converters.writing.convert import convert_checkpoint

    outtype = reference_outtype(source)

    def converting(step: Progress) -> None:
        progress(Progress(step.done, step.total, step.unit, "converting"))

    try:
        folder = temporary_folder(scratch or source, "reference")
    except OSError as error:
        raise QuantizeError(f"Cannot make a temporary folder in {scratch or source} for the converted reference "
                            f"({error.strerror or error}); choose an output folder you can write to.") from error
    try:
        converted = convert_checkpoint(source, None, outtype=outtype, output_folder=folder, progress=converting,
                                       cancel=cancel)
        yield converted.path, source / converted.path.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def variant_file_name(reference: Path, type_label: str) -> str:
    """GGUF naming: the reference's name with its type replaced (Model-135M-F16.gguf → Model-135M-Q4_K_M.gguf)."""
    return f"{_TYPE_SUFFIX.sub('', reference.stem)}-{type_label}.gguf"


def reference_outtype(folder: Path) -> str:
    """BF16 checkpoints stay BF16 (exact); everything else becomes F16."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "f16"
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    return "bf16" if dtype == "bfloat16" else "f16"


def already_quantized(header: GGUFHeader) -> str | None:
    """The quantized types among the weight matrices ("Q4_1, Q6_K"), or None for a float (reference) model."""
    quantized = {t.type.name for t in header.tensors if len(t.shape) >= 2 and t.type not in _UNQUANTIZED}
    return ", ".join(sorted(quantized)) if quantized else None


def _importance_matrix(
    choice: ImatrixChoice,
    preset: Preset,
    reference: Path,
    header: GGUFHeader,
    calibration: _Calibration,
    inputs: CalibrationInputs | None,
    progress: ProgressFn,
    cancel: CancelToken,
) -> tuple[ImportanceMatrix | None, ImatrixUse | None]:
    """The matrix and where it came from; when calibrating for error feedback, the same pass spills the inputs."""
    if choice is None or (isinstance(choice, str) and choice.lower() == NONE):
        return None, None
    if isinstance(choice, ImportanceMatrix):
        matrix, origin = choice, "given"
    elif isinstance(choice, str) and choice.lower() == AUTO:
        if not preset.uses_imatrix:
            return None, None

        def calibrating(step: Progress) -> None:
            progress(Progress(step.done, step.total, step.unit, "calibrating"))

        texts = calibration.texts
        calibrated = calibrate(reference, None, texts, chunks=calibration.chunks, ctx=calibration.ctx,
                               gpu_layers=calibration.gpu_layers, progress=calibrating, cancel=cancel,
                               covariance_chunks=inputs.chunks if inputs is not None else 0,
                               spill_folder=inputs.folder_for_spill() if inputs is not None else None)
        if inputs is not None:
            inputs.adopt(calibrated)
        matrix = calibrated.matrix
        origin = AUTO if not texts else "calibrated on " + ", ".join(Path(t.name).name for t in texts)
    else:
        matrix, origin = read_imatrix(Path(choice)), str(choice)
    check_matches_model(matrix, {t.name: t.shape for t in header.tensors}, model=reference.name)
    return matrix, ImatrixUse(origin, tuple(matrix.datasets), len(matrix.entries), matrix.chunk_count)


def _run(
    reference: Path,
    temporary: Path,
    preset: Preset,
    plan: QuantPlan | None,
    matrix: ImportanceMatrix | None,
    use: ImatrixUse | None,
    requantize: bool,
    threads: int,
    progress: ProgressFn,
    cancel: CancelToken,
    extra_metadata: Mapping[str, str | int | float],
) -> tuple[str, ...]:
    from native.quantizer import QuantizeRequest, run_quantizer

    metadata: dict[str, str | int | float | bool] = {
        **extra_metadata,
        "qdesk.version": _qdesk_version(),
        "qdesk.plan": plan.label if plan is not None else f"preset {preset.name}",
        "qdesk.source": reference.name,
        "qdesk.imatrix": use.origin if use is not None else NONE,
    }
    if use is not None and matrix is not None:
        metadata.update({
            "quantize.imatrix.file": use.origin,
            "quantize.imatrix.dataset": ", ".join(use.datasets),
            "quantize.imatrix.entries_count": use.entries,
            "quantize.imatrix.chunks_count": use.chunks,
        })
    request = QuantizeRequest(
        str(reference), str(temporary), preset.ftype, threads=threads, imatrix=matrix_data(matrix),
        tensor_types=plan.types() if plan is not None else {}, metadata=metadata, allow_requantize=requantize,
    )

    def quantizing(done: int, total: int, name: str) -> None:
        progress(Progress(done, total, "tensors", "quantizing"))

    report = _native(lambda: run_quantizer(request, quantizing, lambda: cancel.cancelled))
    return tuple(_reworded(warning) for warning in report.warnings if "falling back" not in warning)


def _like_bytes(budget: MixBudget | None, reference: Path, header: GGUFHeader,
                matrix: ImportanceMatrix | None) -> int | None:
    """The tensor bytes of the preset a `--like` budget names (from a dry run), checked to be within reach."""
    if budget is None or budget.like is None:
        return None
    like_bytes = preset_plan(reference, budget.like, matrix).n_bytes
    check_budget(budget, reference, header, like_bytes)
    return like_bytes


def _mix_plan(reference: Path, header: GGUFHeader, budget: MixBudget, like_bytes: int | None,
              matrix: ImportanceMatrix | None, texts: Sequence[CalibrationText] | None, gpu_layers: int,
              effort: ProbeEffort, inputs: CalibrationInputs | None, progress: ProgressFn,
              cancel: CancelToken) -> MixPlan:
    def measuring(step: Progress) -> None:
        progress(Progress(step.done, step.total, step.unit, step.message))

    sensitivity = cached_sensitivity(reference, matrix, texts, gpu_layers=gpu_layers, progress=measuring,
                                     layer_bands=effort.layer_bands, probe_chunks=effort.probe_chunks,
                                     probe_ctx=effort.probe_ctx, cancel=cancel)
    if inputs is not None:
        sensitivity = feedback_sensitivity(sensitivity, reference, inputs, matrix, progress=progress, cancel=cancel)
    return plan_mix(reference, header, budget, sensitivity, like_bytes)


def _reworded(warning: str) -> str:
    fallback = _FALLBACK_SUMMARY.search(warning)
    if fallback is None:
        return warning
    return (f"{fallback['count']} of {fallback['total']} tensors have rows whose length is not a multiple of the "
            "preset's block size, so they got the nearest type that fits, as llama.cpp's own quantizer does.")


def _qdesk_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qdesk")
    except PackageNotFoundError:
        return "unknown"


def _native(call: Callable[[], _T]) -> _T:
    from native.errors import NativeError, Stopped

    try:
        return call()
    except Stopped:
        raise Cancelled("quantization was cancelled") from None
    except NativeError as error:
        raise QuantizeError(str(error)) from error


def _plan_from_header(written: GGUFHeader, *, reference_header: GGUFHeader, base: str, label: str) -> QuantPlan:
    sources = {t.name: t for t in reference_header.tensors}
    tensors = tuple(
        PlannedTensor(t.name, t.shape, type_name(sources[t.name].type) if t.name in sources else type_name(t.type),
                      type_name(t.type))
        for t in written.tensors
    )
    return QuantPlan(tensors, base, label)


def _mismatch_sentence(asked: QuantPlan, got: QuantPlan) -> str:
    wanted = asked.types()
    for name, type_ in got.types().items():
        if wanted.get(name) != type_:
            return (f"llama.cpp wrote {name} as {type_} although the plan asked for {wanted.get(name)}; "
                    "the plan cannot be applied as it is.")
    return "llama.cpp's output does not follow the plan; the plan cannot be applied as it is."

