"""Issue 10's quality bar: llama.cpp's presets and hand-written rule mixes, KLD against size, on two models.

    .venv/bin/python bench/mix_quality.py [--models original,broken] [--chunks 16] [--calibration-chunks 48]
        [--json-out .cache/bench/mix/mix_quality.json] [--svg-out .cache/bench/mix/mix_quality.svg]
        [--markdown-out FILE] [--mix] [--mix-bpw 4.25,4.5,5,5.5,6,6.5,7,8] [--keep-variants] [--threads N]

Models (`bench/_support/mix_models.py`): SmolLM2-135M-Instruct converted by qdesk to F32 from the test suite's HF
checkpoint ("original", whose weights lie on Q4_1's grid), and a copy with 8 % of each 32-weight block's standard
deviation of seeded Gaussian noise added to every weight matrix ("broken"). Each is calibrated once on the built-in
calibration text. For each model every variant is quantized from the F32 reference and evaluated against it by
`qdesk.evaluation.evaluate.evaluate` on the built-in held-out text (`--chunks` chunks of 512 tokens):

* presets: Q2_K … Q8_0, each with the model's importance matrix and without one;
* rules: every family in `bench/_support/rule_mixes.py` at every base type q4_0 … q8_0, with the matrix;
* mix (`--mix`): the sensitivity mix (`quantize(reference, out, MixBudget(size_bytes=…))`) at the file sizes of
  Q3_K_M, Q4_K_M and Q5_K_M and at `--mix-bpw` budgets (see `mix_variant`), each with the KLD its plan predicts,
  rounded with error feedback as `qdesk quantize` does by default;
* encoder diagnostics (with `--mix`): at those three sizes the preset and the best rule with error feedback, and the
  mix with llama.cpp's rounding, so the rounding's share of the gain can be told from the allocation's.

Prints, per model, a table sorted by size and, for Q3_K_M, Q4_K_M and Q5_K_M, the preset's KLD against the best
rule mix no larger, how many presets and rules the mix curve lies below, and the rounding table; writes the raw
results as JSON and a self-contained SVG of KLD against bits per weight.

Everything is cached under `.cache/bench/mix/`: checkpoints, references, importance matrices, the reference
distributions (`QDESK_CACHE_DIR` points there unless set), and the results, keyed by what determines them (the
reference's fingerprint, the per-tensor types, the importance matrix, the evaluation chunks), so a rerun only
quantizes and evaluates what changed. Variant GGUFs are deleted after their evaluation unless `--keep-variants`.
Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_CACHE = REPO_ROOT / ".cache" / "bench" / "mix"
os.environ.setdefault("QDESK_CACHE_DIR", str(DEFAULT_CACHE / "qdesk-cache"))

from bench._support.mix_models import BenchModel, Timings, prepare_models  # noqa: E402
from bench._support.rule_mixes import LEGACY_LADDER, RULES, rule_named, rule_plan  # noqa: E402
from converters.calibration.imatrix import ImportanceMatrix, read_imatrix  # noqa: E402
from converters.core.gguf_file import file_fingerprint  # noqa: E402
from converters.mix.feedback import FEEDBACK_CHUNKS  # noqa: E402
from converters.mix.sensitivity import Sensitivity  # noqa: E402
from converters.quantization.plan import QuantPlan  # noqa: E402
from converters.quantization.quantize import preset_plan, quantize  # noqa: E402

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
BAR_PRESETS = ("Q3_K_M", "Q4_K_M", "Q5_K_M")
IMATRIX_BLIND_TYPES = {"q8_0", "f16", "f32", "bf16"}
"""Types whose encoder ignores the importance matrix: a variant made only of these does not depend on it."""
SERIES_PRESET = "preset + imatrix"
SERIES_PRESET_PLAIN = "preset, no imatrix"
SERIES_MIX = "mix"
SERIES_ENCODER = "encoder: "
"""Prefix of the diagnostic series that swap the rounding: a preset or rule with error feedback, a mix with
ggml's rounding (in their own table, not in the bars or the plot)."""
SENSITIVITY_KEY = "sensitivity/1"
"""Part of a mix variant's key besides its types: the file also records `qdesk.mix.*` (a few bytes more)."""
RESULTS_FORMAT = "qdesk.bench.mix_quality/1"
TWIN_NOTE = "same tensors as"
MB = 1_000_000
DEFAULT_MIX_BPW = "4.25,4.5,5,5.5,6,6.5,7,8"
"""SmolLM2-135M has no mix below 4.14 bpw: rows of 576 take no type smaller than q4_0 (4.5 bpw)."""


@dataclass(frozen=True)
class Variant:
    """One file to make and measure. Variants with the same `fingerprint` are the same tensors: measured once."""

    label: str
    series: str
    fingerprint: str
    build: Callable[[Path], None]
    note: str = ""
    predicted_kld: float | None = None
    """For a mix: the KLD its plan predicts (what the file records as `qdesk.mix.predicted_kld`)."""


@dataclass
class Measured:
    label: str
    series: str
    fingerprint: str
    bytes: int
    bpw: float
    kld_mean: float
    kld_median: float
    kld_p99: float
    ppl: float
    top1: float
    delta_p: float
    quantize_s: float
    eval_s: float
    reused: bool = False
    note: str = ""
    type_counts: dict[str, int] = field(default_factory=dict)
    predicted_kld: float | None = None


MIX_EFFORT = "default"


def mix_variant(reference: Path, output: Path, budget_bytes: int, matrix: ImportanceMatrix) -> None:
    """The sensitivity mix at `budget_bytes` (file size), written to `output` (the measurement is cached, so
    every budget after the first costs one allocation and one quantization)."""
    from converters.mix.allocate import MixBudget
    from converters.quantization.quantize import quantize

    quantize(reference, output, MixBudget(size_bytes=budget_bytes), matrix, mix_effort=MIX_EFFORT)


def mix_sensitivity(reference: Path, matrix: ImportanceMatrix) -> Sensitivity:
    """The measurement `quantize` makes for a mix of `reference` (the same cache entry, so it is made once)."""
    from converters.mix.sensitivity import cached_sensitivity, effort_named

    effort = effort_named(MIX_EFFORT)
    return cached_sensitivity(reference, matrix, None, gpu_layers=0, layer_bands=effort.layer_bands,
                              probe_chunks=effort.probe_chunks, probe_ctx=effort.probe_ctx)


def mix_available() -> bool:
    return True


def twin_name(result: Measured) -> str:
    return f"{result.label} no imatrix" if result.series == SERIES_PRESET_PLAIN else result.label


def digest(document: object) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            hasher.update(block)
    return hasher.hexdigest()[:16]


@dataclass(frozen=True)
class ModelContext:
    model: BenchModel
    matrix: ImportanceMatrix
    base_plan: QuantPlan
    """Every tensor of the model (Q8_0's plan): what the rules rewrite."""
    key: dict[str, str]
    """Reference and importance-matrix fingerprints plus the llama.cpp version: part of every variant's key."""

    def fingerprint(self, types: dict[str, str], uses_matrix: bool, extra: object = None) -> str:
        needs_matrix = uses_matrix and not set(types.values()) <= IMATRIX_BLIND_TYPES
        return digest({"reference": self.key["reference"], "llama": self.key["llama"], "types": types,
                       "imatrix": self.key["imatrix"] if needs_matrix else None, "extra": extra})


def model_context(model: BenchModel) -> ModelContext:
    import llama_cpp

    key = {"reference": file_fingerprint(model.reference), "imatrix": file_digest(model.imatrix),
           "llama": llama_cpp.__version__}
    return ModelContext(model, read_imatrix(model.imatrix), preset_plan(model.reference, "Q8_0"), key)


def preset_variants(context: ModelContext) -> list[Variant]:
    reference, matrix = context.model.reference, context.matrix
    variants = []
    for with_matrix in (True, False):
        for preset in PRESETS:
            types = preset_plan(reference, preset, matrix if with_matrix else None).types()

            def build(output: Path, preset: str = preset, with_matrix: bool = with_matrix) -> None:
                quantize(reference, output, preset, imatrix=matrix if with_matrix else "none")

            variants.append(Variant(preset, SERIES_PRESET if with_matrix else SERIES_PRESET_PLAIN,
                                    context.fingerprint(types, with_matrix), build))
    return variants


def rule_variants(context: ModelContext) -> list[Variant]:
    reference, matrix = context.model.reference, context.matrix
    variants = []
    for rule in RULES:
        for base in LEGACY_LADDER:
            plan = rule_plan(context.base_plan, rule, base)

            def build(output: Path, plan: QuantPlan = plan) -> None:
                quantize(reference, output, plan, imatrix=matrix)

            variants.append(Variant(f"{rule.name}@{base}", f"rule {rule.name}",
                                    context.fingerprint(plan.types(), True), build))
    return variants


def mix_budgets(presets: Sequence[Measured], n_parameters: int, overhead: int, bpw_budgets: Sequence[float]
                ) -> list[tuple[str, int]]:
    """(label, file bytes) budgets: each bar preset's file size (`--like`), then each of `bpw_budgets`."""
    by_label = {m.label: m for m in presets if m.series == SERIES_PRESET}
    budgets = [(f"like {name}", by_label[name].bytes) for name in BAR_PRESETS if name in by_label]
    budgets += [(f"{bpw:g} bpw", round(bpw * n_parameters / 8) + overhead) for bpw in bpw_budgets]
    return budgets


def mix_variants(context: ModelContext, budgets: Sequence[tuple[str, int]], log: Callable[[str], None]
                 ) -> list[Variant]:
    """One variant per budget the model allows, keyed by the plan's types (planning is milliseconds once the
    sensitivity is measured, so a rerun re-measures only mixes whose tensors changed)."""
    from converters.core.gguf_file import check_gguf
    from converters.mix.allocate import MixBudget, MixError, plan_mix
    from converters.mix.feedback import collect_input_covariances, feedback_sensitivity

    reference, matrix = context.model.reference, context.matrix
    started = time.monotonic()
    covariances = collect_input_covariances(reference, chunks=FEEDBACK_CHUNKS)
    sensitivity = feedback_sensitivity(mix_sensitivity(reference, matrix), reference, covariances, matrix)
    log(f"  [{context.model.name}] sensitivity: measured in {sensitivity.seconds:.1f} s "
        f"({len(sensitivity.group_kld)} groups, {sensitivity.probe_tokens} probe tokens; this run "
        f"{time.monotonic() - started:.1f} s)")
    header = check_gguf(reference)
    variants = []
    for label, budget in budgets:
        try:
            mix = plan_mix(reference, header, MixBudget(size_bytes=budget), sensitivity)
        except MixError as error:
            log(f"  [{context.model.name}] mix {label}: {error}")
            continue

        def build(output: Path, budget: int = budget) -> None:
            mix_variant(reference, output, budget, matrix)

        variants.append(Variant(f"mix {label}", SERIES_MIX,
                                context.fingerprint(mix.plan.types(), True,
                                                    extra={"mix": SENSITIVITY_KEY, "encoder": "error-feedback/2",
                                                           "feedback_chunks": FEEDBACK_CHUNKS}), build,
                                note=f"budget {budget / MB:.2f} MB", predicted_kld=mix.predicted_kld))
    return variants


def encoder_variants(context: ModelContext, results: Sequence[Measured]) -> list[Variant]:
    """At each bar budget, the same files with the other rounding: the preset and the best rule no larger with
    error feedback, and the mix with ggml's rounding, so that the allocation's share of the gain and the
    encoder's can be told apart."""
    from converters.core.gguf_file import check_gguf
    from converters.mix.allocate import MixBudget, plan_mix

    reference, matrix = context.model.reference, context.matrix
    header = check_gguf(reference)
    plain_sensitivity = mix_sensitivity(reference, matrix)
    feedback = {"encoder": "error-feedback/2", "feedback_chunks": FEEDBACK_CHUNKS}
    variants = []
    for name, preset, rule in bar_peers(results):
        preset_types = preset_plan(reference, name, matrix).types()

        def preset_build(output: Path, name: str = name) -> None:
            quantize(reference, output, name, imatrix=matrix, encoder="feedback")

        variants.append(Variant(f"{name} + feedback", f"{SERIES_ENCODER}preset + feedback",
                                context.fingerprint(preset_types, True, extra=feedback), preset_build))
        if rule is not None:
            family, base = rule.label.split("@")
            plan = rule_plan(context.base_plan, rule_named(family), base)

            def rule_build(output: Path, plan: QuantPlan = plan) -> None:
                quantize(reference, output, plan, imatrix=matrix, encoder="feedback")

            variants.append(Variant(f"{rule.label} + feedback", f"{SERIES_ENCODER}rule + feedback",
                                    context.fingerprint(plan.types(), True, extra=feedback), rule_build,
                                    note=f"the best rule within {name}'s size"))
        mix = plan_mix(reference, header, MixBudget(size_bytes=preset.bytes), plain_sensitivity)

        def mix_build(output: Path, budget: int = preset.bytes) -> None:
            quantize(reference, output, MixBudget(size_bytes=budget), matrix, mix_effort=MIX_EFFORT, encoder="ggml")

        variants.append(Variant(f"mix like {name}, ggml rounding", f"{SERIES_ENCODER}mix, ggml rounding",
                                context.fingerprint(mix.plan.types(), True, extra={"mix": SENSITIVITY_KEY}),
                                mix_build, predicted_kld=mix.predicted_kld))
    return variants


class ResultStore:
    """Measured variants of one model by fingerprint and evaluation settings, saved after every measurement."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path, self.settings = path, settings
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            document = {}
        self.records: dict[str, dict[str, Any]] = document.get("records", {}) \
            if document.get("format") == RESULTS_FORMAT else {}

    def _key(self, fingerprint: str) -> str:
        return digest({"variant": fingerprint, **self.settings})

    def get(self, fingerprint: str) -> dict[str, Any] | None:
        return self.records.get(self._key(fingerprint))

    def put(self, fingerprint: str, record: dict[str, Any]) -> None:
        self.records[self._key(fingerprint)] = record
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"format": RESULTS_FORMAT, "records": self.records}, indent=1),
                             encoding="utf-8")
        temporary.replace(self.path)


@dataclass
class RunSettings:
    chunks: int
    ctx: int
    threads: int | None
    keep_variants: bool


def measure(variant: Variant, context: ModelContext, store: ResultStore, settings: RunSettings,
            reference_ppl: dict[str, float]) -> Measured:
    """Quantize and evaluate `variant` (or take both from the store)."""
    from converters.core.gguf_file import check_gguf
    from converters.quantization.plan import type_name
    from qdesk.evaluation.evaluate import evaluate

    cached = store.get(variant.fingerprint)
    if cached is not None:
        reference_ppl.setdefault("ppl", cached.get("reference_ppl", math.nan))
        return Measured(**{**cached["measured"], "label": variant.label, "series": variant.series,
                           "reused": True, "note": variant.note, "predicted_kld": variant.predicted_kld})
    folder = context.model.reference.parent / "variants"
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / f"{variant.fingerprint}.gguf"
    started = time.monotonic()
    if not output.is_file():
        variant.build(output)
    quantized = time.monotonic()
    evaluation = evaluate(context.model.reference, [output], chunks=settings.chunks, ctx=settings.ctx,
                          memory_ctx=None, n_threads=settings.threads)
    evaluated = time.monotonic()
    candidate = evaluation.candidates[0]
    divergence = candidate.divergence
    assert divergence is not None, "a variant of the reference has the reference's vocabulary"
    counts: dict[str, int] = {}
    for tensor in check_gguf(output).tensors:
        counts[type_name(tensor.type)] = counts.get(type_name(tensor.type), 0) + 1
    result = Measured(variant.label, variant.series, variant.fingerprint, candidate.model.bytes,
                      candidate.model.bpw or math.nan, divergence.mean, divergence.median, divergence.p99,
                      candidate.ppl, divergence.top1_agreement, divergence.delta_p_mean,
                      quantized - started, evaluated - quantized, note=variant.note, type_counts=counts,
                      predicted_kld=variant.predicted_kld)
    reference_ppl["ppl"] = evaluation.reference.ppl
    store.put(variant.fingerprint, {"measured": asdict(result), "reference_ppl": evaluation.reference.ppl})
    if not settings.keep_variants:
        output.unlink(missing_ok=True)
    return result


@dataclass
class ModelReport:
    name: str
    reference: Path
    reference_bytes: int
    n_parameters: int
    reference_ppl: float
    results: list[Measured]
    seconds: dict[str, float]


def run_model(context: ModelContext, settings: RunSettings, with_mix: bool, mix_bpw: Sequence[float],
              log: Callable[[str], None]) -> ModelReport:
    model = context.model
    store = ResultStore(model.reference.parent / f"results-{settings.chunks}x{settings.ctx}.json",
                        {"chunks": settings.chunks, "ctx": settings.ctx})
    reference_ppl: dict[str, float] = {}
    seconds = {"quantize": 0.0, "evaluate": 0.0}
    measured_by_fingerprint: dict[str, Measured] = {}
    results: list[Measured] = []

    def run(variants: list[Variant]) -> None:
        for variant in variants:
            twin = measured_by_fingerprint.get(variant.fingerprint)
            if twin is not None:
                result = Measured(**{**asdict(twin), "label": variant.label, "series": variant.series,
                                     "reused": True, "note": f"{TWIN_NOTE} {twin_name(twin)}"})
            else:
                try:
                    result = measure(variant, context, store, settings, reference_ppl)
                except Exception as error:
                    if variant.series != SERIES_MIX and not variant.series.startswith(SERIES_ENCODER):
                        raise
                    log(f"  [{model.name}] {variant.label}: the mix failed ({type(error).__name__}: {error})")
                    continue
                measured_by_fingerprint[variant.fingerprint] = result
                if not result.reused:
                    seconds["quantize"] += result.quantize_s
                    seconds["evaluate"] += result.eval_s
            results.append(result)
            how = "reused" if result.reused else f"quantize {result.quantize_s:5.1f} s, eval {result.eval_s:5.1f} s"
            log(f"  [{model.name}] {result.series:24s} {result.label:20s} {result.bytes / MB:7.2f} MB "
                f"{result.bpw:5.3f} bpw  KLD {result.kld_mean:.5f}  ({how})")

    run(preset_variants(context))
    run(rule_variants(context))
    if with_mix and mix_available():
        q8 = next(m for m in results if m.label == "Q8_0")
        overhead = q8.bytes - sum(t.n_bytes for t in context.base_plan.tensors)
        run(mix_variants(context, mix_budgets(results, context.base_plan.n_elements, overhead, mix_bpw), log))
        run(encoder_variants(context, results))
    return ModelReport(model.name, model.reference, model.reference.stat().st_size, context.base_plan.n_elements,
                       reference_ppl.get("ppl", math.nan), results, seconds)


def best_within(results: Sequence[Measured], series_prefix: str, max_bytes: int) -> Measured | None:
    fitting = [m for m in results if m.series.startswith(series_prefix) and m.bytes <= max_bytes]
    return min(fitting, key=lambda m: m.kld_mean, default=None)


def bar_peers(results: Sequence[Measured]) -> list[tuple[str, Measured, Measured | None]]:
    """Per bar preset measured: its name, the preset with the importance matrix, and the best rule no larger."""
    peers = []
    for name in BAR_PRESETS:
        preset = next((m for m in results if m.label == name and m.series == SERIES_PRESET), None)
        if preset is not None:
            peers.append((name, preset, best_within(results, "rule ", preset.bytes)))
    return peers


def bar_rows(report: ModelReport) -> list[dict[str, Any]]:
    rows = []
    for name, preset, rule in bar_peers(report.results):
        mix = best_within(report.results, SERIES_MIX, preset.bytes)
        rows.append({
            "preset": name, "preset_bytes": preset.bytes, "preset_kld": preset.kld_mean,
            "rule": rule.label if rule else None, "rule_bytes": rule.bytes if rule else None,
            "rule_kld": rule.kld_mean if rule else None,
            "rule_over_preset": rule.kld_mean / preset.kld_mean if rule else None,
            "mix": mix.label if mix else None, "mix_bytes": mix.bytes if mix else None,
            "mix_kld": mix.kld_mean if mix else None,
            "mix_over_preset": mix.kld_mean / preset.kld_mean if mix else None,
            "mix_over_rule": mix.kld_mean / rule.kld_mean if mix and rule else None,
        })
    return rows


def curve_comparison(results: Sequence[Measured]) -> tuple[list[Measured], list[Measured]]:
    """The presets and rules within the mix curve's range of bits per weight, and those of them the curve does not
    lie below (its log KLD interpolated linearly in bpw between neighbouring mixes)."""
    mixes = sorted((m for m in results if m.series == SERIES_MIX and m.kld_mean > 0), key=lambda m: m.bpw)
    if len(mixes) < 2:
        return [], []
    within = [m for m in unique_rows(results) if m.series != SERIES_MIX and not m.series.startswith(SERIES_ENCODER)
              and mixes[0].bpw <= m.bpw <= mixes[-1].bpw]
    not_below = []
    for point in within:
        low, high = next((a, b) for a, b in pairwise(mixes) if a.bpw <= point.bpw <= b.bpw)
        share = (point.bpw - low.bpw) / (high.bpw - low.bpw) if high.bpw > low.bpw else 0.0
        curve = math.exp(math.log(low.kld_mean) + share * (math.log(high.kld_mean) - math.log(low.kld_mean)))
        if curve >= point.kld_mean:
            not_below.append(point)
    return within, not_below


def encoder_rows(report: ModelReport) -> list[list[Measured | None]]:
    """Per bar preset: the preset, the best rule no larger and the mix, each with ggml's rounding and with error
    feedback."""
    rows = []
    for name, preset, rule in bar_peers(report.results):

        def diagnostic(label: str) -> Measured | None:
            return next((m for m in report.results if m.series.startswith(SERIES_ENCODER) and m.label == label), None)

        rows.append([preset, diagnostic(f"{name} + feedback"), rule,
                     diagnostic(f"{rule.label} + feedback") if rule else None,
                     diagnostic(f"mix like {name}, ggml rounding"),
                     next((m for m in report.results if m.series == SERIES_MIX and m.label == f"mix like {name}"),
                          None)])
    return rows


def unique_rows(results: Sequence[Measured]) -> list[Measured]:
    """Each measured file once, sorted by size (a row sharing another's tensors is folded into its note)."""
    rows: list[Measured] = []
    for result in sorted(results, key=lambda m: (m.bytes, m.kld_mean)):
        if result.note.startswith(TWIN_NOTE):
            continue
        rows.append(result)
    return rows


def markdown(reports: Sequence[ModelReport], prose: dict[str, Any] | None, settings: RunSettings,
             calibration_chunks: int) -> str:
    lines = [f"Evaluation: built-in held-out text, {settings.chunks} chunks × {settings.ctx} tokens; importance "
             f"matrices: built-in calibration text, {calibration_chunks} chunks × 512.", ""]
    if prose is not None:
        lines += [f"Prose perplexity (F32 references, `resources/eval/text/prose.txt`, {prose['chunks']} chunks): "
                  f"original {prose['original_ppl']:.3f}, grid-broken {prose['broken_ppl']:.3f} "
                  f"(+{100 * (prose['broken_ppl'] / prose['original_ppl'] - 1):.1f} %); KLD of grid-broken "
                  f"against original {prose['kld_mean']:.4f}.", ""]
    for report in reports:
        twins: dict[str, list[str]] = {}
        for result in report.results:
            if result.note.startswith(TWIN_NOTE):
                twins.setdefault(result.fingerprint, []).append(twin_name(result))
        lines += [f"### {report.name}: reference F32 {report.reference_bytes / MB:.1f} MB, "
                  f"{report.n_parameters / 1e6:.1f} M parameters, PPL {report.reference_ppl:.3f}", "",
                  "| variant | series | MB | bpw | mean KLD | PPL | top-1 |", "|---|---|---:|---:|---:|---:|---:|"]
        for m in unique_rows(report.results):
            also = twins.get(m.fingerprint)
            label = m.label + (f" (= {', '.join(also)})" if also else "")
            lines.append(f"| {label} | {m.series} | {m.bytes / MB:.2f} | {m.bpw:.3f} | {m.kld_mean:.5f} | "
                         f"{m.ppl:.3f} | {100 * m.top1:.2f} % |")
        lines += ["", f"Quality bar on {report.name} (best at no more bytes than the preset):", "",
                  "| preset | MB | KLD (imatrix) | best rule ≤ size | MB | KLD | rule/preset | mix | MB | KLD | "
                  "mix/preset | mix/rule |", "|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
        for row in bar_rows(report):
            lines.append(
                f"| {row['preset']} | {row['preset_bytes'] / MB:.2f} | {row['preset_kld']:.5f} | {row['rule'] or '—'} "
                f"| {_number(row['rule_bytes'], MB, '.2f')} | {_number(row['rule_kld'], 1, '.5f')} "
                f"| {_number(row['rule_over_preset'], 1, '.3f')} | {row['mix'] or '—'} "
                f"| {_number(row['mix_bytes'], MB, '.2f')} | {_number(row['mix_kld'], 1, '.5f')} "
                f"| {_number(row['mix_over_preset'], 1, '.3f')} | {_number(row['mix_over_rule'], 1, '.3f')} |")
        lines.append("")
        within, not_below = curve_comparison(report.results)
        if within:
            exceptions = "; ".join(f"{m.label} ({m.series}, {m.bpw:.3f} bpw, KLD {m.kld_mean:.5f})" for m in not_below)
            lines += [f"The mix curve lies below {len(within) - len(not_below)} of the {len(within)} presets and "
                      f"rules within its range of bits per weight" + (f"; not below: {exceptions}." if not_below
                                                                       else "."), ""]
        encoder_table = encoder_rows(report)
        if encoder_table:
            lines += [f"Rounding against allocation on {report.name} (mean KLD; sizes as in the bar table):", "",
                      "| budget | preset | preset + feedback | best rule | rule + feedback | mix, ggml rounding | "
                      "mix (feedback) |", "|---|---:|---:|---|---:|---:|---:|"]
            for preset, preset_fed, rule, rule_fed, mix_plain, mix in encoder_table:
                cells = [_number(m.kld_mean if m else None, 1, ".5f") for m in (preset, preset_fed)]
                cells.append(f"{rule.label}: {rule.kld_mean:.5f}" if rule else "—")
                cells += [_number(m.kld_mean if m else None, 1, ".5f") for m in (rule_fed, mix_plain, mix)]
                lines.append(f"| {preset.label} | " + " | ".join(cells) + " |")
            lines.append("")
        mixes = sorted((m for m in report.results if m.series == SERIES_MIX), key=lambda m: m.bytes)
        if mixes:
            lines += [f"Mixes on {report.name}, predicted against measured KLD:", "",
                      "| mix | MB | bpw | predicted KLD | measured KLD | measured/predicted |",
                      "|---|---:|---:|---:|---:|---:|"]
            for m in mixes:
                ratio = m.kld_mean / m.predicted_kld if m.predicted_kld else None
                lines.append(f"| {m.label} | {m.bytes / MB:.2f} | {m.bpw:.3f} | {_number(m.predicted_kld, 1, '.5f')} "
                             f"| {m.kld_mean:.5f} | {_number(ratio, 1, '.2f')} |")
            lines.append("")
    return "\n".join(lines)


def _number(value: float | None, scale: float, spec: str) -> str:
    return "—" if value is None else format(value / scale, spec)


ENVELOPE = "best rule at no larger size"
LEGEND_COLUMN = 270
SERIES_STYLE = {
    ENVELOPE: ("#000000", "line", False),
    SERIES_PRESET: ("#111111", "circle", True),
    SERIES_PRESET_PLAIN: ("#8a8a8a", "circle", False),
    SERIES_MIX: ("#d62728", "diamond", True),
}
RULE_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#bcbd22", "#8c564b", "#e377c2", "#ff7f0e",
                "#393b79", "#637939")


def series_style(series: str) -> tuple[str, str, bool]:
    if series in SERIES_STYLE:
        return SERIES_STYLE[series]
    names = [f"rule {rule.name}" for rule in RULES]
    index = names.index(series) if series in names else len(names)
    return RULE_COLOURS[index % len(RULE_COLOURS)], "square", True


def _marker(shape: str, x: float, y: float, colour: str, filled: bool, title: str) -> str:
    fill = colour if filled else "white"
    tooltip = f"<title>{html.escape(title)}</title>"
    if shape == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{fill}" stroke="{colour}">{tooltip}</circle>'
    if shape == "diamond":
        points = f"{x:.1f},{y - 5:.1f} {x + 5:.1f},{y:.1f} {x:.1f},{y + 5:.1f} {x - 5:.1f},{y:.1f}"
        return f'<polygon points="{points}" fill="{fill}" stroke="{colour}">{tooltip}</polygon>'
    return (f'<rect x="{x - 3:.1f}" y="{y - 3:.1f}" width="6" height="6" fill="{fill}" stroke="{colour}">'
            f"{tooltip}</rect>")


def rule_envelope(results: Sequence[Measured]) -> list[Measured]:
    """The rule mixes that are the best rule at their size or any larger one: the bar's staircase."""
    best: list[Measured] = []
    for m in sorted((m for m in results if m.series.startswith("rule ")), key=lambda m: (m.bytes, m.kld_mean)):
        if not best or m.kld_mean < best[-1].kld_mean:
            best.append(m)
    return best


def preset_twins(results: Sequence[Measured], preset: Measured) -> str:
    """The preset's label, joined by the presets of its series that share its tensors (Q2_K=Q3_K_S)."""
    return "=".join(m.label for m in results if m.series == preset.series and m.fingerprint == preset.fingerprint)


def svg_plot(reports: Sequence[ModelReport]) -> str:
    """KLD (log scale) against bits per weight, one panel per model, every series with its own marker."""
    width, height, left, right, top, bottom = 560, 430, 64, 16, 34, 46
    all_points = [m for report in reports for m in report.results
                  if m.kld_mean > 0 and not m.series.startswith(SERIES_ENCODER)]
    low_bpw = math.floor(min(m.bpw for m in all_points) * 2) / 2
    high_bpw = math.ceil(max(m.bpw for m in all_points) * 2) / 2
    low_kld = math.floor(math.log10(min(m.kld_mean for m in all_points)))
    high_kld = math.ceil(math.log10(max(m.kld_mean for m in all_points)))
    series = sorted({m.series for m in all_points},
                    key=lambda s: (s != SERIES_MIX, s != SERIES_PRESET, s != SERIES_PRESET_PLAIN, s))
    columns = max(1, width * len(reports) // LEGEND_COLUMN)
    legend_rows = math.ceil((len(series) + 1) / columns)
    total_height = height + 24 + 18 * legend_rows
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(reports)}" height="{total_height}" '
             f'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for panel, report in enumerate(reports):
        origin = panel * width

        def x_of(bpw: float, origin: int = origin) -> float:
            return origin + left + (bpw - low_bpw) / (high_bpw - low_bpw) * (width - left - right)

        def y_of(kld: float) -> float:
            return top + (high_kld - math.log10(kld)) / (high_kld - low_kld) * (height - top - bottom)

        parts.append(f'<text x="{origin + width / 2}" y="18" text-anchor="middle" font-size="13" '
                     f'font-weight="bold">{html.escape(report.name)}: mean KLD vs bits per weight</text>')
        parts.append(f'<rect x="{origin + left}" y="{top}" width="{width - left - right}" '
                     f'height="{height - top - bottom}" fill="none" stroke="#444"/>')
        for decade in range(low_kld, high_kld + 1):
            for step in (1, 2, 5):
                value = step * 10.0**decade
                if not 10.0**low_kld <= value <= 10.0**high_kld:
                    continue
                y = y_of(value)
                parts.append(f'<line x1="{origin + left}" x2="{origin + width - right}" y1="{y:.1f}" y2="{y:.1f}" '
                             f'stroke="{"#ccc" if step == 1 else "#eee"}"/>')
                if step == 1 or high_kld - low_kld <= 2:
                    parts.append(f'<text x="{origin + left - 4}" y="{y + 4:.1f}" text-anchor="end">{value:g}</text>')
        bpw = low_bpw
        while bpw <= high_bpw + 1e-9:
            x = x_of(bpw)
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{height - bottom}" stroke="#eee"/>')
            parts.append(f'<text x="{x:.1f}" y="{height - bottom + 14}" text-anchor="middle">{bpw:g}</text>')
            bpw += 0.5
        parts.append(f'<text x="{origin + width / 2}" y="{height - 12}" text-anchor="middle">bits per weight '
                     f"(file tensor data)</text>")
        parts.append(f'<text x="{origin + 14}" y="{(top + height - bottom) / 2}" text-anchor="middle" '
                     f'transform="rotate(-90 {origin + 14} {(top + height - bottom) / 2})">mean KLD (nats, log)'
                     f"</text>")
        envelope = rule_envelope(report.results)
        if envelope:
            steps = [(envelope[0].bpw, envelope[0].kld_mean)]
            for previous, current in pairwise(envelope):
                steps += [(current.bpw, previous.kld_mean), (current.bpw, current.kld_mean)]
            steps.append((high_bpw, envelope[-1].kld_mean))
            path = " ".join(f"{x_of(bpw):.1f},{y_of(kld):.1f}" for bpw, kld in steps)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{series_style(ENVELOPE)[0]}" '
                         f'stroke-width="1.5" stroke-dasharray="4 3"/>')
        for name in series:
            points = sorted((m for m in report.results if m.series == name and m.kld_mean > 0),
                            key=lambda m: m.bpw)
            colour, shape, filled = series_style(name)
            if name != SERIES_PRESET and name != SERIES_PRESET_PLAIN and len(points) > 1:
                path = " ".join(f"{x_of(m.bpw):.1f},{y_of(m.kld_mean):.1f}" for m in points)
                wide = 2.5 if name == SERIES_MIX else 1.2
                parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="{wide}"/>')
            for m in points:
                title = f"{m.label} ({m.series}): {m.bytes / MB:.2f} MB, {m.bpw:.3f} bpw, KLD {m.kld_mean:.5f}"
                parts.append(_marker(shape, x_of(m.bpw), y_of(m.kld_mean), colour, filled, title))
                if name == SERIES_PRESET and not m.note.startswith(TWIN_NOTE):
                    parts.append(f'<text x="{x_of(m.bpw) + 5:.1f}" y="{y_of(m.kld_mean) - 5:.1f}" '
                                 f'font-size="9">{html.escape(preset_twins(report.results, m))}</text>')
    for index, name in enumerate([*series, ENVELOPE]):
        colour, shape, filled = series_style(name)
        x = 20 + (index % columns) * LEGEND_COLUMN
        y = height + 14 + 18 * (index // columns)
        if name == ENVELOPE:
            parts.append(f'<line x1="{x - 6}" x2="{x + 6}" y1="{y - 4}" y2="{y - 4}" stroke="{colour}" '
                         f'stroke-width="1.5" stroke-dasharray="4 3"/>')
        else:
            parts.append(_marker(shape, x, y - 4, colour, filled, name))
        parts.append(f'<text x="{x + 10}" y="{y}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def prose_check(models: Sequence[BenchModel], cache: Path, threads: int | None) -> dict[str, Any] | None:
    """Perplexity of both F32 references on the built-in prose text, and the broken one's KLD from the original."""
    by_name = {model.name: model for model in models}
    if "original" not in by_name or "broken" not in by_name:
        return None
    from qdesk.evaluation.evaluate import evaluate
    from qdesk.evaluation.text import builtin_eval_texts

    original, broken = by_name["original"].reference, by_name["broken"].reference
    key = digest({"original": file_fingerprint(original), "broken": file_fingerprint(broken)})
    record = cache / "prose-check.json"
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved
    except (OSError, ValueError):
        pass
    prose = [text for text in builtin_eval_texts() if text.name.endswith(":prose")]
    started = time.monotonic()
    evaluation = evaluate(original, [broken], texts=prose, memory_ctx=None, n_threads=threads)
    candidate = evaluation.candidates[0]
    result = {"key": key, "chunks": evaluation.chunks, "original_ppl": evaluation.reference.ppl,
              "broken_ppl": candidate.ppl, "kld_mean": candidate.divergence.mean if candidate.divergence else None,
              "seconds": time.monotonic() - started}
    record.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="original,broken", help="comma-separated: original, broken")
    parser.add_argument("--chunks", type=int, default=16, help="evaluation chunks of --ctx tokens (default 16)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--calibration-chunks", type=int, default=48)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--checkpoint-cache", type=Path, default=REPO_ROOT / ".cache" / "tests",
                        help="where tests.builders.starter.smollm2_checkpoint keeps the HF checkpoint "
                             "(default: the test suite's, shared and only read)")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_CACHE / "mix_quality.json")
    parser.add_argument("--svg-out", type=Path, default=DEFAULT_CACHE / "mix_quality.svg")
    parser.add_argument("--markdown-out", type=Path, default=DEFAULT_CACHE / "mix_quality.md")
    parser.add_argument("--mix", action="store_true", help="add converters.mix.allocate.quantize_mix's series")
    parser.add_argument("--mix-bpw", default=DEFAULT_MIX_BPW,
                        help="bits-per-weight budgets for --mix, besides the sizes of Q3_K_M, Q4_K_M and Q5_K_M")
    parser.add_argument("--keep-variants", action="store_true", help="keep every variant GGUF in the cache")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    started = time.monotonic()
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = set(names) - {"original", "broken"}
    if unknown:
        parser.error(f"unknown model {sorted(unknown)[0]!r}; choose original and/or broken")
    args.cache.mkdir(parents=True, exist_ok=True)
    settings = RunSettings(args.chunks, args.ctx, args.threads, args.keep_variants)
    timings = Timings({}, record=args.cache / "cold-timings.json")
    print(f"mix_quality: {', '.join(names)}; eval {args.chunks}×{args.ctx}, calibration {args.calibration_chunks}"
          f"×512; cache {args.cache}; {platform.machine()}, {os.cpu_count()} cores", flush=True)

    models = prepare_models(args.cache, args.checkpoint_cache, names, args.calibration_chunks, timings)
    prose: list[dict[str, Any] | None] = []
    timings.timed("prose perplexity check", lambda: prose.append(prose_check(models, args.cache, args.threads)))
    if prose[0] is not None:
        p = prose[0]
        print(f"prose PPL: original {p['original_ppl']:.3f}, grid-broken {p['broken_ppl']:.3f} "
              f"(+{100 * (p['broken_ppl'] / p['original_ppl'] - 1):.1f} %, issue 10 expects about +33 %); "
              f"KLD broken vs original {p['kld_mean']:.4f}", flush=True)

    mix_bpw = [float(value) for value in args.mix_bpw.split(",") if value.strip()]
    reports = []
    for model in models:
        print(f"{model.name}: {model.reference}", flush=True)
        model_started = time.monotonic()
        report = run_model(model_context(model), settings, args.mix, mix_bpw, lambda line: print(line, flush=True))
        measured = unique_rows(report.results)
        timings.remember_cold(f"{model.name}: quantize ({len(measured)} distinct variants)",
                              sum(m.quantize_s for m in measured))
        timings.remember_cold(f"{model.name}: evaluate ({len(measured)} distinct variants)",
                              sum(m.eval_s for m in measured))
        timings.steps[f"{model.name}: quantize (this run)"] = report.seconds["quantize"]
        timings.steps[f"{model.name}: evaluate (this run)"] = report.seconds["evaluate"]
        timings.steps[f"{model.name}: all variants (this run)"] = time.monotonic() - model_started
        reports.append(report)
    timings.steps["total (this run)"] = time.monotonic() - started

    text = markdown(reports, prose[0], settings, args.calibration_chunks)
    print("\n" + text)
    print("Timings (s): this run, and when the step last did its work (cold)")
    for step in dict.fromkeys([*timings.cold, *timings.steps]):
        now, cold = timings.steps.get(step), timings.cold.get(step)
        print(f"  {step:50s} {'' if now is None else f'{now:8.1f}':>8s} {'' if cold is None else f'{cold:8.1f}':>8s}")
    document = {
        "format": RESULTS_FORMAT,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {"eval_chunks": args.chunks, "ctx": args.ctx, "calibration_chunks": args.calibration_chunks,
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores", "mix": args.mix},
        "prose_check": prose[0],
        "models": {report.name: {"reference": str(report.reference), "reference_bytes": report.reference_bytes,
                                 "n_parameters": report.n_parameters, "reference_ppl": report.reference_ppl,
                                 "variants": [asdict(m) for m in report.results], "bars": bar_rows(report)}
                   for report in reports},
        "timings_s": {"this_run": timings.steps, "cold": timings.cold},
    }
    write_outputs(args, document, reports, text)


def write_outputs(args: argparse.Namespace, document: dict[str, object], reports: Sequence[ModelReport],
                  text: str) -> None:
    """The JSON document, the plot (when anything was measured) and the Markdown, where the options name them."""
    plot = svg_plot(reports) if any(report.results for report in reports) else ""
    for path, content in ((args.json_out, json.dumps(document, indent=1) + "\n"), (args.svg_out, plot),
                          (args.markdown_out, text + "\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    print(f"JSON: {args.json_out}\nSVG: {args.svg_out}\nMarkdown: {args.markdown_out}")


if __name__ == "__main__":
    main()
