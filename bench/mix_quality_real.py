"""Issue 20's quality bar: the sensitivity mix against llama.cpp's presets on real 256-aligned models.

    .venv/bin/python bench/mix_quality_real.py [--models qwen-1.5b,qwen-0.5b,starter] [--chunks 16] [--ctx 512]
        [--presets Q2_K,Q3_K_S,Q3_K_M,Q4_K_S,Q4_K_M,Q5_K_M,Q6_K] [--feedback] [--awq] [--mix-effort default]
        [--bpw 2.0,1.8]
        [--json-out FILE] [--svg-out FILE] [--markdown-out FILE] [--threads N] [--keep-variants]

Models: the grid-broken Qwen2.5-Coder-1.5B-Instruct and Qwen2.5-Coder-0.5B (`bench/_support/real_models.py`: F16
references by our converter, importance matrices of 48 × 512 tokens of the built-in calibration text), and the
grid-broken SmolLM2-135M starter (`bench/_support/mix_models.py`, F32), so that nothing regresses there. Every
variant is quantized from the reference with the model's importance matrix and evaluated against it on the held-out
text (`resources/eval/text`, never the calibration text; `--chunks` × `--ctx`, scored as `qdesk eval` scores):

* preset: llama.cpp's preset, its own rounding;
* preset + feedback (`--feedback`): the preset's types with our error-feedback rounding (`--encoder feedback`);
* mix: `qdesk quantize --like PRESET` as it is made by default (its encoder is recorded), with the KLD its plan
  predicts;
* mix, ggml rounding: the same budget with llama.cpp's rounding, when that is not already the default;
* with `--awq`, the bar presets (Q3_K_M, Q4_K_M, Q5_K_M) after activation-aware scaling (`--awq`), with
  llama.cpp's rounding and with error feedback;
* with `--bpw`, the mix at those bits per weight as well (below the smallest preset: the i-quants' range). The
  i-quant presets (IQ4_XS, IQ3_S, IQ3_XXS, IQ2_XS, …) are named with `--presets` like the others.

Prints, per model, mean KLD, its 99th percentile and top-1 agreement of every variant, the ratios mix/preset and
mix/(preset + feedback) at each preset's size, and predicted against measured KLD; writes JSON, a Markdown table
and an SVG of KLD against bits per weight. Results are cached per variant (reference, importance matrix, types,
encoder, evaluation settings) in each model's folder, so an interrupted run resumes where it stopped; variant files
are deleted after their evaluation unless `--keep-variants`. Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_CACHE = REPO_ROOT / ".cache" / "bench" / "mix"
os.environ.setdefault("QDESK_CACHE_DIR", str(DEFAULT_CACHE / "qdesk-cache"))

from bench._support.mix_models import BenchModel, Timings, prepare_models  # noqa: E402
from bench._support.real_models import DEFAULT_REAL_CACHE, REAL_MODELS, prepare_real_model  # noqa: E402
from bench.mix_quality import (  # noqa: E402
    MB,
    SERIES_MIX,
    SERIES_PRESET,
    SERIES_STYLE,
    Measured,
    ModelContext,
    ModelReport,
    ResultStore,
    RunSettings,
    Variant,
    measure,
    model_context,
    write_outputs,
)
from converters.core.gguf_file import check_gguf  # noqa: E402
from converters.mix.allocate import MixBudget, plan_mix  # noqa: E402
from converters.mix.feedback import FEEDBACK_CHUNKS, FEEDBACK_METHOD  # noqa: E402
from converters.mix.sensitivity import Sensitivity  # noqa: E402
from converters.quantization.plan import QuantPlan  # noqa: E402
from converters.quantization.quantize import _chosen_encoder, preset_plan, quantize  # noqa: E402

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K")
BAR_PRESETS = ("Q3_K_M", "Q4_K_M", "Q5_K_M")
SERIES_PRESET_FEEDBACK = "preset + feedback"
SERIES_MIX_GGML = "mix, ggml rounding"
SERIES_ABLATION = "mix, "
"""Prefix of a mix planned with one method change undone (`ABLATIONS`)."""
RESULTS_FORMAT = "qdesk.bench.mix_quality_real/1"
MIX_METHOD_KEY = "sensitivity/2"
AWQ_METHOD_KEY = "diagonal-search/1"
SERIES_AWQ_SUFFIX = " + awq"
SERIES_STYLE.update({  # each series of this benchmark its own marker in the plot
    SERIES_PRESET_FEEDBACK: ("#2ca02c", "circle", True),
    SERIES_MIX_GGML: ("#d62728", "diamond", False),
    SERIES_PRESET + SERIES_AWQ_SUFFIX: ("#ff7f0e", "square", False),
    SERIES_PRESET_FEEDBACK + SERIES_AWQ_SUFFIX: ("#9467bd", "square", True),
})
STARTER = "starter"
ENCODER_FILE_TAG = {"ggml": None, "feedback": "error-feedback/2"}


def prepare(name: str, calibration_chunks: int, timings: Timings) -> BenchModel:
    if name == STARTER:
        model = prepare_models(DEFAULT_CACHE, REPO_ROOT / ".cache" / "tests", ["broken"], calibration_chunks,
                               timings)[0]
        return BenchModel(STARTER, model.checkpoint, model.reference, model.imatrix)
    started = time.monotonic()
    real = prepare_real_model(name, DEFAULT_REAL_CACHE, log=lambda line: print(f"  {line}", flush=True))
    timings.add(f"{name}: build", time.monotonic() - started)
    return BenchModel(name, real.checkpoint, real.reference, real.imatrix)


def encoder_extra(encoder: str) -> dict[str, object] | None:
    return None if encoder == "ggml" else {"encoder": ENCODER_FILE_TAG[encoder], "feedback_chunks": FEEDBACK_CHUNKS,
                                           "method": FEEDBACK_METHOD}


def preset_variants(context: ModelContext, presets: Sequence[str], encoders: Sequence[str],
                    awq: bool = False) -> list[Variant]:
    """Each preset with each encoder; with `awq`, after activation-aware scaling (`qdesk quantize --awq`)."""
    reference, matrix = context.model.reference, context.matrix
    variants = []
    for encoder in encoders:
        for preset in presets:
            types = preset_plan(reference, preset, matrix).types()

            def build(output: Path, preset: str = preset, encoder: str = encoder) -> None:
                quantize(reference, output, preset, imatrix=matrix, encoder=encoder, awq=awq)

            series = SERIES_PRESET if encoder == "ggml" else SERIES_PRESET_FEEDBACK
            extra = {**(encoder_extra(encoder) or {}), **({"awq": AWQ_METHOD_KEY} if awq else {})} or None
            variants.append(Variant(preset, series + (SERIES_AWQ_SUFFIX if awq else ""),
                                    context.fingerprint(types, True, extra=extra), build))
    return variants


def mix_variants(context: ModelContext, presets: Sequence[str], effort: str, with_feedback: bool,
                 ablations: Sequence[str], log: Callable[[str], None], bpw_budgets: Sequence[float] = ()
                 ) -> list[Variant]:
    """The mix at each preset's size, with the encoder `qdesk quantize` picks for it, and with ggml's rounding
    when that is another; keyed by the plan's types (the sensitivity is measured once and cached)."""
    from converters.mix.feedback import collect_input_covariances, feedback_sensitivity
    from converters.mix.sensitivity import cached_sensitivity, effort_named

    reference, matrix = context.model.reference, context.matrix
    header = check_gguf(reference)
    default_encoder = _chosen_encoder(None, MixBudget(like="Q4_K_M"), None)
    encoders = [default_encoder] + [e for e in ("ggml", "feedback") if e != default_encoder
                                    and (e == "ggml" or with_feedback)]
    settings = effort_named(effort)
    started = time.monotonic()
    plain = cached_sensitivity(reference, matrix, None, gpu_layers=0, layer_bands=settings.layer_bands,
                               probe_chunks=settings.probe_chunks, probe_ctx=settings.probe_ctx)
    log(f"  [{context.model.name}] sensitivity: {len(plain.group_kld)} groups, {plain.probe_tokens} probe tokens, "
        f"measured in {plain.seconds:.0f} s (this run {time.monotonic() - started:.0f} s); default encoder "
        f"{default_encoder}")
    variants = []
    covariances = None
    for encoder in encoders:
        sensitivity = plain
        if encoder == "feedback":
            covariances = collect_input_covariances(reference, chunks=FEEDBACK_CHUNKS)
            sensitivity = feedback_sensitivity(plain, reference, covariances, matrix)
        budgets = [(f"mix like {preset}", MixBudget(like=preset)) for preset in presets]
        budgets += [(f"mix {bpw:g} bpw", MixBudget(bpw=bpw)) for bpw in bpw_budgets]
        for label, budget in budgets:
            like_bytes = preset_plan(reference, budget.like, matrix).n_bytes if budget.like else None
            mix = plan_mix(reference, header, budget, sensitivity, like_bytes)

            def build(output: Path, budget: MixBudget = budget, encoder: str = encoder) -> None:
                quantize(reference, output, budget, matrix, mix_effort=effort, encoder=encoder)

            extra = {"mix": MIX_METHOD_KEY, **(encoder_extra(encoder) or {})}
            series = SERIES_MIX if encoder == default_encoder else (
                SERIES_MIX_GGML if encoder == "ggml" else f"mix, {encoder}")
            variants.append(Variant(label, series, context.fingerprint(mix.plan.types(), True, extra),
                                    build, note=f"{encoder} rounding", predicted_kld=mix.predicted_kld))
        if encoder != default_encoder:
            continue
        for ablation in ablations:
            changed = ABLATIONS[ablation](plain)
            if encoder == "feedback":
                changed = feedback_sensitivity(changed, reference, covariances, matrix)
            for preset in [p for p in presets if p in BAR_PRESETS]:
                like_bytes = preset_plan(reference, preset, matrix).n_bytes
                mix = plan_mix(reference, header, MixBudget(like=preset), changed, like_bytes)

                def ablated_build(output: Path, plan: QuantPlan = mix.plan, encoder: str = encoder) -> None:
                    quantize(reference, output, plan, matrix, encoder=encoder)

                extra = {"mix": MIX_METHOD_KEY, **(encoder_extra(encoder) or {})}
                variants.append(Variant(f"mix like {preset}", f"{SERIES_ABLATION}{ablation}",
                                        context.fingerprint(mix.plan.types(), True, extra), ablated_build,
                                        note=f"{encoder} rounding", predicted_kld=mix.predicted_kld))
    return variants


def without_input_rounding(sensitivity: Sensitivity) -> Sensitivity:
    """The damages as before input rounding was charged: the weights' own error alone."""
    return replace(sensitivity, tensors=tuple(
        replace(tensor, options=tuple(replace(option, input_damage=0.0) for option in tensor.options))
        for tensor in sensitivity.tensors))


def tied_roles_joined(sensitivity: Sensitivity) -> Sensitivity:
    """A tied embedding valued as before its roles were probed apart: one gain (the sum of the two roles' gains;
    both roles' damages are the same unweighted error when the importance matrix has no entry for it), which error
    feedback's product ratio then scales whole."""
    joined = []
    for tensor in sensitivity.tensors:
        if tensor.lookup_gain > 0:
            tensor = replace(tensor, gain=tensor.gain + tensor.lookup_gain, lookup_gain=0.0,
                             options=tuple(replace(option, lookup_damage=0.0) for option in tensor.options))
        joined.append(tensor)
    return replace(sensitivity, tensors=tuple(joined))


ABLATIONS: dict[str, Callable[[Sensitivity], Sensitivity]] = {
    "no input rounding": without_input_rounding,
    "tied roles joined": tied_roles_joined,
}


def run_model(context: ModelContext, settings: RunSettings, presets: Sequence[str], with_mix: bool,
              with_feedback: bool, effort: str, ablations: Sequence[str], log: Callable[[str], None],
              bpw_budgets: Sequence[float] = (), awq: bool = False) -> ModelReport:
    model = context.model
    store = ResultStore(model.reference.parent / f"results-real-{settings.chunks}x{settings.ctx}.json",
                        {"chunks": settings.chunks, "ctx": settings.ctx})
    reference_ppl: dict[str, float] = {}
    seconds = {"quantize": 0.0, "evaluate": 0.0}
    results: list[Measured] = []

    def run(variants: list[Variant]) -> None:
        for variant in variants:
            try:
                result = measure(variant, context, store, settings, reference_ppl)
            except Exception as error:  # one failed variant (memory, say) must not lose the others' figures
                log(f"  [{model.name}] {variant.series} {variant.label}: failed ({type(error).__name__}: {error})")
                continue
            if not result.reused:
                seconds["quantize"] += result.quantize_s
                seconds["evaluate"] += result.eval_s
            results.append(result)
            how = "reused" if result.reused else f"quantize {result.quantize_s:5.0f} s, eval {result.eval_s:5.0f} s"
            log(f"  [{model.name}] {result.series:20s} {result.label:16s} {result.bytes / MB:8.2f} MB "
                f"{result.bpw:5.3f} bpw  KLD {result.kld_mean:.5f}  p99 {result.kld_p99:.4f}  "
                f"top-1 {100 * result.top1:.2f} %  ({how})")

    run(preset_variants(context, presets, ["ggml"]))
    mixes = mix_variants(context, presets, effort, with_feedback, ablations, log, bpw_budgets) if with_mix else []
    run([variant for variant in mixes if variant.series == SERIES_MIX])  # the bar's three series first
    if with_feedback:
        run(preset_variants(context, presets, ["feedback"]))
    run([variant for variant in mixes if variant.series != SERIES_MIX])
    if awq:
        run(preset_variants(context, [p for p in presets if p in BAR_PRESETS], ["ggml", "feedback"], awq=True))
    return ModelReport(model.name, model.reference, model.reference.stat().st_size, context.base_plan.n_elements,
                       reference_ppl.get("ppl", math.nan), results, seconds)


def find(results: Sequence[Measured], series: str, label: str) -> Measured | None:
    return next((m for m in results if m.series == series and m.label == label), None)


def ratio_rows(report: ModelReport, presets: Sequence[str]) -> list[dict[str, object]]:
    rows = []
    for preset in presets:
        plain = find(report.results, SERIES_PRESET, preset)
        fed = find(report.results, SERIES_PRESET_FEEDBACK, preset)
        mix = find(report.results, SERIES_MIX, f"mix like {preset}")
        mix_ggml = find(report.results, SERIES_MIX_GGML, f"mix like {preset}")
        if plain is None:
            continue
        rows.append({
            "preset": preset, "preset_bytes": plain.bytes, "preset_kld": plain.kld_mean,
            "preset_feedback_kld": fed.kld_mean if fed else None,
            "mix_bytes": mix.bytes if mix else None, "mix_kld": mix.kld_mean if mix else None,
            "mix_encoder": mix.note if mix else None, "mix_ggml_kld": mix_ggml.kld_mean if mix_ggml else None,
            "mix_over_preset": mix.kld_mean / plain.kld_mean if mix else None,
            "mix_over_preset_feedback": mix.kld_mean / fed.kld_mean if mix and fed else None,
            "mix_ggml_over_preset": mix_ggml.kld_mean / plain.kld_mean if mix_ggml else None,
            "bar": preset in BAR_PRESETS,
        })
    return rows


def _cell(value: object, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(float(value) / scale, spec)  # type: ignore[arg-type]


def markdown(reports: Sequence[ModelReport], presets: Sequence[str], settings: RunSettings) -> str:
    lines = [f"Evaluation: held-out text (resources/eval/text), {settings.chunks} chunks × {settings.ctx} tokens; "
             "importance matrices: built-in calibration text, 48 chunks × 512.", ""]
    for report in reports:
        lines += [f"### {report.name}: reference {report.reference_bytes / MB:.0f} MB, "
                  f"{report.n_parameters / 1e6:.0f} M parameters, PPL {report.reference_ppl:.3f}", "",
                  "| variant | series | MB | bpw | mean KLD | p99 KLD | top-1 | predicted |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for m in sorted(report.results, key=lambda m: (m.bytes, m.series)):
            lines.append(f"| {m.label} | {m.series} | {m.bytes / MB:.2f} | {m.bpw:.3f} | {m.kld_mean:.5f} | "
                         f"{m.kld_p99:.4f} | {100 * m.top1:.2f} % | {_cell(m.predicted_kld, '.5f')} |")
        lines += ["", f"Ratios on {report.name} (the mix at the preset's size, no larger):", "",
                  "| budget | preset KLD | preset + feedback | mix | mix/preset | mix/(preset + feedback) | "
                  "mix, ggml rounding | its ratio to the preset |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in ratio_rows(report, presets):
            name = f"**{row['preset']}**" if row["bar"] else str(row["preset"])
            lines.append(f"| {name} | {row['preset_kld']:.5f} | {_cell(row['preset_feedback_kld'], '.5f')} | "
                         f"{_cell(row['mix_kld'], '.5f')} | {_cell(row['mix_over_preset'], '.3f')} | "
                         f"{_cell(row['mix_over_preset_feedback'], '.3f')} | {_cell(row['mix_ggml_kld'], '.5f')} | "
                         f"{_cell(row['mix_ggml_over_preset'], '.3f')} |")
        lines.append("")
        ablated = sorted({m.series for m in report.results
                          if m.series.startswith(SERIES_ABLATION) and m.series[len(SERIES_ABLATION):] in ABLATIONS})
        if ablated:
            lines += [f"Method changes undone on {report.name} (mean KLD of the mix planned without the change; "
                      "same budget and rounding):", "",
                      "| budget | mix | " + " | ".join(ablated) + " |", "|---|---:|" + "---:|" * len(ablated)]
            for preset in [p for p in presets if p in BAR_PRESETS]:
                mix = find(report.results, SERIES_MIX, f"mix like {preset}")
                cells = []
                for series in ablated:
                    other = find(report.results, series, f"mix like {preset}")
                    cells.append("—" if other is None else f"{other.kld_mean:.5f}"
                                 + (f" ({other.kld_mean / mix.kld_mean:.2f}×)" if mix else ""))
                mix_cell = _cell(mix.kld_mean if mix else None, ".5f")
                lines.append(f"| {preset} | {mix_cell} | " + " | ".join(cells) + " |")
            lines.append("")
        scaled = [(preset, find(report.results, series, preset), find(report.results, series + SERIES_AWQ_SUFFIX,
                                                                        preset))
                  for preset in presets for series in (SERIES_PRESET, SERIES_PRESET_FEEDBACK)]
        scaled = [(preset, plain, awq) for preset, plain, awq in scaled if plain and awq]
        if scaled:
            lines += [f"Activation-aware scaling on {report.name} (`--awq`; same types):", "",
                      "| preset | rounding | without | with --awq | ratio |", "|---|---|---:|---:|---:|"]
            for preset, plain, awq in scaled:
                rounding = "feedback" if plain.series == SERIES_PRESET_FEEDBACK else "ggml"
                lines.append(f"| {preset} | {rounding} | {plain.kld_mean:.5f} | {awq.kld_mean:.5f} | "
                             f"{awq.kld_mean / plain.kld_mean:.3f} |")
            lines.append("")
        predicted = [m for m in report.results if m.predicted_kld]
        if predicted:
            lines += [f"Predicted against measured on {report.name}:", "",
                      "| mix | rounding | predicted | measured | measured/predicted |", "|---|---|---:|---:|---:|"]
            for m in sorted(predicted, key=lambda m: (m.series, m.bytes)):
                lines.append(f"| {m.label} | {m.note} | {m.predicted_kld:.5f} | {m.kld_mean:.5f} | "
                             f"{m.kld_mean / m.predicted_kld:.2f} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="qwen-1.5b,starter",
                        help=f"comma-separated: {', '.join([*REAL_MODELS, STARTER])}")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--feedback", action="store_true",
                        help="add the presets with error-feedback rounding (and the feedback mix where it is not "
                             "the default); the calibration inputs are spilled beside the reference")
    parser.add_argument("--no-mix", action="store_true", help="measure the presets only")
    parser.add_argument("--awq", action="store_true",
                        help="add the bar presets with activation-aware scaling, alone and with feedback rounding")
    parser.add_argument("--bpw", default="", help="comma-separated bits per weight: mixes at these budgets too "
                                                  "(below the smallest preset, say: 2.0,1.8)")
    parser.add_argument("--ablations", default="",
                        help=f"comma-separated, at the bar presets' sizes: {', '.join(ABLATIONS)}")
    parser.add_argument("--mix-effort", default="default")
    parser.add_argument("--calibration-chunks", type=int, default=48, help="for the starter's importance matrix")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_REAL_CACHE / "mix_quality_real.json")
    parser.add_argument("--svg-out", type=Path, default=DEFAULT_REAL_CACHE / "mix_quality_real.svg")
    parser.add_argument("--markdown-out", type=Path, default=DEFAULT_REAL_CACHE / "mix_quality_real.md")
    parser.add_argument("--keep-variants", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    started = time.monotonic()
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = set(names) - {*REAL_MODELS, STARTER}
    if unknown:
        parser.error(f"unknown model {sorted(unknown)[0]!r}; choose from {', '.join([*REAL_MODELS, STARTER])}")
    presets = [preset.strip().upper() for preset in args.presets.split(",") if preset.strip()]
    settings = RunSettings(args.chunks, args.ctx, args.threads, args.keep_variants)
    DEFAULT_REAL_CACHE.mkdir(parents=True, exist_ok=True)
    timings = Timings({}, record=DEFAULT_REAL_CACHE / "cold-timings.json")
    print(f"mix_quality_real: {', '.join(names)}; eval {args.chunks}×{args.ctx}; presets {', '.join(presets)}; "
          f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    reports = []
    for name in names:
        model = prepare(name, args.calibration_chunks, timings)
        print(f"{name}: {model.reference}", flush=True)
        model_started = time.monotonic()
        ablations = [a for a in ABLATIONS if a in args.ablations.split(",")]
        if name != STARTER:
            ablations = [a for a in ablations if a != "tied roles joined"]  # the Qwen models' output is untied
        report = run_model(model_context(model), settings, presets, not args.no_mix, args.feedback, args.mix_effort,
                           ablations, lambda line: print(line, flush=True),
                           [float(bpw) for bpw in args.bpw.split(",") if bpw.strip()], args.awq)
        timings.steps[f"{name}: variants (this run)"] = time.monotonic() - model_started
        reports.append(report)
    text = markdown(reports, presets, settings)
    print("\n" + text)
    document = {
        "format": RESULTS_FORMAT,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {"eval_chunks": args.chunks, "ctx": args.ctx, "presets": presets, "effort": args.mix_effort,
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load": os.getloadavg()},
        "models": {report.name: {"reference": str(report.reference), "reference_bytes": report.reference_bytes,
                                 "n_parameters": report.n_parameters, "reference_ppl": report.reference_ppl,
                                 "variants": [asdict(m) for m in report.results],
                                 "ratios": ratio_rows(report, presets)}
                   for report in reports},
        "seconds": {**timings.steps, "total (this run)": time.monotonic() - started},
    }
    write_outputs(args, document, reports, text)


if __name__ == "__main__":
    main()
