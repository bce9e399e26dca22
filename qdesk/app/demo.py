"""`qdesk demo`: the headless story on the bundled starter model, end to end.

From the starter (SmolLM2-135M-Instruct, shipped as Q4_1) it makes an F16 reference, computes an importance
matrix on the built-in calibration text, quantizes the reference to Q8_0, Q4_K_M and Q2_K, measures each
variant against the reference on held-out text (`qdesk eval`), asks every variant the same questions side by
side, and ends with a table of sizes, divergence, speeds and answers and an HTML report. The files go to the
user cache folder and are reused on the next run.
"""

from __future__ import annotations

from pathlib import Path

from converters.core.paths import demo_dir
from converters.core.units import format_count
from qdesk.app.starter import starter_model_path
from qdesk.chat.compare import Comparison, compare
from qdesk.chat.engine import LoadOptions, SamplingOptions
from qdesk.display.tables import text_table
from qdesk.evaluation.evaluate import Evaluation, ModelFacts, evaluate
from qdesk.evaluation.report import write_report
from qdesk.library.info import read_model_info

DEMO_QUESTIONS = ("What is the capital of France?", "Name three primary colors.")
DEMO_SYSTEM_PROMPT = "You are a helpful assistant."
DEMO_PRESETS = ("Q8_0", "Q4_K_M", "Q2_K")
DEMO_CALIBRATION_CHUNKS = 8
DEMO_CALIBRATION_CTX = 256
DEMO_MAX_TOKENS = 40
DEMO_EVAL_CHUNKS = 8


def run_demo() -> int:
    folder = demo_dir()
    folder.mkdir(parents=True, exist_ok=True)
    starter = starter_model_path()
    info = read_model_info(starter)
    print(f"qdesk demo: {info.name} ({format_count(info.parameters)} parameters, shipped as {info.file_type}) "
          f"in {folder}\n")
    variants = make_variants(starter, folder)
    _step(f"measuring each variant against the F16 reference on {DEMO_EVAL_CHUNKS} chunks of held-out text")
    evaluation = evaluate(variants[0], variants[1:], chunks=DEMO_EVAL_CHUNKS, memory_ctx=2048)
    html_path, _ = write_report(evaluation.to_json(), folder / "report.html")
    print()
    sampling = SamplingOptions(temperature=0.0, max_tokens=DEMO_MAX_TOKENS, seed=0)
    comparisons = [compare(variants, question, system=DEMO_SYSTEM_PROMPT, sampling=sampling,
                           load=LoadOptions(n_ctx=512)) for question in DEMO_QUESTIONS]
    print(render_report(variants, comparisons, evaluation))
    print(f"\nThe full report (chart, memory, where each variant disagrees): {html_path}")
    return 0


def make_variants(starter: Path, folder: Path) -> list[Path]:
    """The F16 reference and the preset variants, made once and reused."""
    from converters.calibration.calibrate import calibrate
    from converters.calibration.imatrix import read_imatrix
    from converters.quantization.quantize import quantize

    reference = folder / "SmolLM2-135M-Instruct-F16.gguf"
    if not reference.is_file():
        _step(f"reference: dequantizing the starter to {reference.name}")
        quantize(starter, reference, "F16", imatrix="none")
    matrix_path = folder / "SmolLM2-135M-Instruct.imatrix.gguf"
    if not matrix_path.is_file():
        _step(f"importance matrix: {DEMO_CALIBRATION_CHUNKS} chunks of built-in calibration text")
        calibrate(reference, matrix_path, chunks=DEMO_CALIBRATION_CHUNKS, ctx=DEMO_CALIBRATION_CTX)
    matrix = read_imatrix(matrix_path)
    variants = [reference]
    for preset in DEMO_PRESETS:
        target = folder / f"SmolLM2-135M-Instruct-{preset}.gguf"
        if not target.is_file():
            _step(f"quantizing to {preset}")
            quantize(reference, target, preset, imatrix=matrix if preset != "Q8_0" else "none")
        variants.append(target)
    _step("variants ready: " + ", ".join(path.name for path in variants))
    return variants


def _step(message: str) -> None:
    print(f"- {message}", flush=True)


def render_report(variants: list[Path], comparisons: list[Comparison], evaluation: Evaluation) -> str:
    divergence = {candidate.model.path: candidate for candidate in evaluation.candidates}
    rows = [("variant", "size MB", "bpw", "PPL", "KLD", "top-1", "tok/s")]
    for index, path in enumerate(variants):
        header = ModelFacts.of(path)
        speeds = [c.answers[index].result.stats.tokens_per_second for c in comparisons
                  if c.answers[index].result is not None]
        speed = f"{sum(speeds) / len(speeds):.0f}" if speeds else "-"
        measured = divergence.get(path)
        ppl = evaluation.reference.ppl if measured is None else measured.ppl
        kld = "ref" if measured is None or measured.divergence is None else f"{measured.divergence.mean:.4f}"
        top1 = "" if measured is None or measured.divergence is None else \
            f"{measured.divergence.top1_agreement * 100:.1f}%"
        rows.append((path.stem.rsplit("-", 1)[-1], f"{header.bytes / 1e6:.1f}", f"{header.bpw or 0:.2f}",
                     f"{ppl:.2f}", kld, top1, speed))
    lines = text_table(rows[0], rows[1:], right=range(1, len(rows[0])), rule=True)
    lines.append(f"(PPL and KLD over {evaluation.scored_tokens} held-out tokens; KLD in nats per token against F16)")
    for comparison in comparisons:
        lines.append("")
        lines.append(f"Q: {comparison.prompt}")
        for index, answer in enumerate(comparison.answers):
            label = rows[index + 1][0]
            text = " ".join(answer.text.split()) if answer.result is not None else f"(failed: {answer.error})"
            mark = "" if index == 0 or answer.divergence is None else \
                f"  [differs from F16 at token {answer.divergence.token_index}]"
            lines.append(f"  {label:>7}: {text}{mark}")
    lines.append("")
    lines.append("Try next: a sensitivity-based mix in the same budget as Q4_K_M, `qdesk quantize REF --like Q4_K_M` "
                 "(docs/mix.md), then `qdesk eval --ref REF CAND…`.")
    return "\n".join(lines)
