"""The evaluation report: one self-contained HTML page, and the JSON document behind it.

`render_html(report)` turns the document `qdesk eval` produces (see docs/report.md for its shape) into one
HTML page that needs nothing from the network: inline CSS, an inline SVG chart, and one line of script that only
opens the collapsed heat maps before printing. It has a header (reference, text, date, qdesk version), a summary
table of the candidates, a size-vs-KLD chart, the task table, the memory table, per-token KLD heat maps over a
sample paragraph, and each candidate's notes; parts the document lacks are left out, headings included.

`write_report(report, "eval.html")` writes `eval.html` and `eval.json` beside it, each complete or not at all.
Every string from the document (file names, token pieces) is escaped; whitespace in token pieces is shown.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import qdesk
from converters.core.atomic import atomic_output
from converters.core.errors import OutputError
from converters.core.outputs import check_outputs

__all__ = ["render_html", "write_report"]

Report = Mapping[str, Any]

MISSING = "—"
REFERENCE_ROW = ' class="reference"'
HEAT_BINS = 8
"""Colour steps of the heat map: step 0 is left uncoloured, steps 1-7 run from pale to strong."""
HEAT_PERCENTILE = 99.0
HEAT_CAP_FLOOR = 0.05
"""Nats. The heat map's full colour is never reached below this, so a near-perfect variant stays pale."""
LOG_SCALE_SPAN = 10.0
"""The chart's KLD axis turns logarithmic when the plotted values span more than this factor."""

CHART_WIDTH = 760
CHART_HEIGHT = 380
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 72, CHART_WIDTH - 24, 18, CHART_HEIGHT - 56
LABEL_CHAR_PX = 6.8


# --- public API ------------------------------------------------------------------------------------------------

def render_html(report: Report) -> str:
    """The whole report as one HTML document that loads nothing from elsewhere."""
    reference = report.get("reference") or {}
    title = f"qdesk evaluation — {reference.get('name') or 'report'}"
    sections = [
        header_section(report),
        summary_section(report),
        chart_section(report),
        tasks_section(report),
        memory_section(report),
        heatmap_section(report),
        notes_section(report),
    ]
    body = "\n".join(section for section in sections if section)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="color-scheme" content="light dark">\n'
        f"<title>{_esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n{_footer()}\n</main>\n{PRINT_SCRIPT}\n</body>\n</html>\n"
    )


def write_report(report: Report, html_path: str | Path) -> tuple[Path, Path]:
    """Write the HTML page and, beside it with a `.json` suffix, the document behind it.

    Both texts are made before anything is written, so a document that cannot be rendered or serialised (a
    value JSON cannot hold) raises and leaves earlier files untouched; both are written to temporary files and
    renamed into place only when both writes succeeded. Non-finite numbers (an overflowing
    perplexity) are written to the JSON as null, since JSON has no NaN or Infinity.
    """
    html_path = Path(html_path)
    json_path = html_path.with_suffix(".json")
    if json_path == html_path:
        raise OutputError(f"Cannot write the report to {html_path}: give a file name ending in .html.")
    check_outputs(_model_paths(report), [html_path, json_path])
    page = render_html(report)
    document = json.dumps(_json_safe(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    with ExitStack() as stack:
        html_temporary = stack.enter_context(atomic_output(html_path))
        json_temporary = stack.enter_context(atomic_output(json_path))
        html_temporary.write_text(page, encoding="utf-8")
        json_temporary.write_text(document, encoding="utf-8")
    return html_path, json_path


def _model_paths(report: Report) -> list[str]:
    """The model files the report describes: writing the report over one of them would destroy it."""
    models = [report.get("reference") or {}, *(report.get("candidates") or [])]
    return [model["path"] for model in models if isinstance(model, Mapping) and isinstance(model.get("path"), str)]


# --- sections ---------------------------------------------------------------------------------------------------

def header_section(report: Report) -> str:
    """Title, reference model, evaluation text, date and qdesk version."""
    reference = report.get("reference") or {}
    facts: list[tuple[str, str]] = []
    if reference:
        path = f'<span class="path">{_esc(reference["path"])}</span>' if reference.get("path") else ""
        facts.append(("Reference", f"<strong>{_esc(reference.get('name'))}</strong>{path}"))
        facts.append(("Reference size", f"{_megabytes(reference.get('bytes'))} MB · "
                                        f"{_fixed(reference.get('bpw'), 2)} bits per weight · "
                                        f"perplexity {_fixed(reference.get('ppl'), 3)}"))
    text = report.get("text")
    if text:
        facts.append(("Evaluation text", _text_description(text)))
    if report.get("created"):
        facts.append(("Created", _esc(_display_date(report["created"]))))
    facts.append(("qdesk", _esc(qdesk.__version__)))
    rows = "\n".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in facts)
    return (f'<header>\n<h1>Quantization report</h1>\n'
            f'<p class="lede">How much each variant differs from {_esc(reference.get("name") or "the reference")}.'
            f"</p>\n<dl class=\"facts\">\n{rows}\n</dl>\n</header>")


def summary_section(report: Report) -> str:
    """One row per variant: size, perplexity, KLD statistics, agreement, task verdict and speed."""
    reference = report.get("reference") or {}
    candidates = _candidates(report)
    if not candidates and not reference:
        return ""
    everyone = [reference, *candidates]
    show_tasks = any(entry.get("tasks") for entry in everyone)
    show_speed = any(entry.get("speed") for entry in everyone)
    scale = _score_scale(report)

    group = ('<tr><th rowspan="2" scope="col">Variant</th><th rowspan="2" class="num">Size MB</th>'
             '<th rowspan="2" class="num">bpw</th><th colspan="2" class="group">Perplexity</th>'
             '<th colspan="4" class="group">KLD vs reference (nats)</th>'
             '<th rowspan="2" class="num" title="How often both models rank the same token first">Top-1 agree</th>'
             '<th rowspan="2" class="num" title="Mean change in the probability of the text\'s next token">'
             "Δp mean</th>")
    if show_tasks:
        group += '<th colspan="2" class="group">Tasks</th>'
    if show_speed:
        group += '<th colspan="2" class="group">Speed (tokens/s)</th>'
    group += "</tr>"
    columns = ('<tr><th class="num">PPL</th><th class="num">ΔPPL</th><th class="num">mean</th>'
               '<th class="num">median</th><th class="num">p99</th><th class="num">max</th>')
    if show_tasks:
        columns += '<th class="num">score</th><th>verdict</th>'
    if show_speed:
        columns += '<th class="num">prompt</th><th class="num">generation</th>'
    columns += "</tr>"

    context = SummaryContext(reference, _short_names(report), scale, show_tasks, show_speed)
    rows = []
    if reference:
        rows.append(_summary_row(reference, context, is_reference=True))
    rows.extend(_summary_row(candidate, context) for candidate in candidates)
    return (
        '<section id="summary">\n<h2>Summary</h2>\n<div class="scroll"><table class="summary">\n'
        f"<thead>\n{group}\n{columns}\n</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table></div>\n"
        f"{SUMMARY_GLOSSARY}\n</section>"
    )


def chart_section(report: Report) -> str:
    """Size against mean KLD for every candidate that has a KLD; the others listed beneath."""
    candidates = _candidates(report)
    if not candidates:
        return ""
    names = _short_names(report)
    plotted = [c for c in candidates if _finite(c.get("kld_mean")) is not None and _finite(c.get("bytes"))]
    unplotted = [c for c in candidates if c not in plotted]
    parts = ['<section id="chart">\n<h2>Size and divergence</h2>']
    if plotted:
        reference_bytes = _finite((report.get("reference") or {}).get("bytes"))
        parts.append(f"<figure>{chart_svg(plotted, names, reference_bytes)}"
                     f"<figcaption>{_chart_caption(plotted)}</figcaption></figure>")
    if unplotted:
        items = "".join(
            f"<li><strong>{_esc(names.get(c.get('name'), c.get('name')))}</strong> — "
            f"{_megabytes(c.get('bytes'))} MB, perplexity {_fixed(c.get('ppl'), 3)}: {_why_no_kld(c)}</li>"
            for c in unplotted)
        parts.append(f'<p class="muted">Not on the chart:</p><ul class="unplotted">{items}</ul>')
    parts.append("</section>")
    return "\n".join(parts)


def tasks_section(report: Report) -> str:
    """Task scores per suite for the reference and each candidate, with the change and the verdict."""
    reference = report.get("reference") or {}
    candidates = _candidates(report)
    reference_tasks = reference.get("tasks") or {}
    scored = [c for c in candidates if c.get("tasks")]
    if not reference_tasks and not scored:
        return ""
    names = _short_names(report)
    scale = _score_scale(report)
    suites = _suite_names(reference_tasks, scored)
    header = '<th scope="col">Suite</th><th class="num" scope="col">Reference</th>' + "".join(
        f'<th class="num" scope="col" title="{_esc(c.get("name"))}">{_esc(names.get(c.get("name")))}</th>'
        for c in candidates)
    rows = []
    for suite in suites:
        reference_score = _suite_reference_score(suite, reference_tasks, scored)
        cells = "".join(_suite_cell(c, suite, scale) for c in candidates)
        rows.append(f'<tr><th scope="row">{_esc(suite)}</th>'
                    f'<td class="num">{_score(reference_score, scale)}</td>{cells}</tr>')
    overall_reference = reference_tasks.get("score")
    if overall_reference is None and scored:
        overall_reference = scored[0]["tasks"].get("reference_score")
    overall = "".join(_overall_cell(c, scale) for c in candidates)
    rows.append(f'<tr class="total"><th scope="row">all</th>'
                f'<td class="num">{_score(overall_reference, scale)}</td>{overall}</tr>')
    verdicts = "".join(_verdict_cell(c) for c in candidates)
    rows.append(f'<tr><th scope="row">verdict</th><td></td>{verdicts}</tr>')
    reasons = "".join(
        f"<li><strong>{_esc(names.get(c.get('name')))}</strong>: {_esc(c['tasks']['reason'])}</li>"
        for c in scored if c["tasks"].get("reason"))
    return (
        f'<section id="tasks">\n<h2>Tasks</h2>\n<p class="muted">{_tasks_caption(reference_tasks, scored)}</p>\n'
        f'<div class="scroll"><table>\n<thead><tr>{header}</tr></thead>\n<tbody>\n' + "\n".join(rows)
        + "\n</tbody>\n</table></div>\n" + (f'<ul class="reasons">{reasons}</ul>\n' if reasons else "")
        + "</section>"
    )


def memory_section(report: Report) -> str:
    """Estimated memory of each variant at the given context: weights, KV cache, compute buffers, total."""
    reference = report.get("reference") or {}
    everyone = [entry for entry in [reference, *_candidates(report)] if entry.get("memory")]
    if not everyone:
        return ""
    names = _short_names(report)
    memories = [entry["memory"] for entry in everyone]
    settings = {(m.get("n_ctx"), m.get("kv_type"), m.get("n_gpu_layers")) for m in memories}
    uniform = len(settings) == 1
    show_devices = any(m.get("vram_bytes") for m in memories)
    header = '<th scope="col">Variant</th>'
    if not uniform:
        header += '<th class="num">context</th><th>KV type</th><th class="num">GPU layers</th>'
    header += ('<th class="num">weights MB</th><th class="num">KV cache MB</th><th class="num">compute MB</th>'
               '<th class="num">total MB</th>')
    if show_devices:
        header += '<th class="num">RAM MB</th><th class="num">VRAM MB</th>'
    rows = []
    for entry in everyone:
        memory = entry["memory"]
        is_reference = entry is reference
        label = (f'<th scope="row" title="{_esc(entry.get("name"))}">'
                 + ("reference " if is_reference else "") + f"{_esc(names.get(entry.get('name')))}</th>")
        cells = ""
        if not uniform:
            cells += (f'<td class="num">{_integer(memory.get("n_ctx"))}</td><td>{_esc(memory.get("kv_type"))}</td>'
                      f'<td class="num">{_integer(memory.get("n_gpu_layers"))}</td>')
        cells += "".join(f'<td class="num">{_megabytes(memory.get(key))}</td>'
                         for key in ("weights_bytes", "kv_bytes", "compute_bytes"))
        cells += f'<td class="num strong">{_megabytes(memory.get("total_bytes"))}</td>'
        if show_devices:
            cells += "".join(f'<td class="num">{_megabytes(memory.get(key))}</td>'
                             for key in ("ram_bytes", "vram_bytes"))
        rows.append(f'<tr{REFERENCE_ROW if is_reference else ""}>{label}{cells}</tr>')
    caption = "Estimated memory to run each variant"
    if uniform:
        n_ctx, kv_type, gpu_layers = next(iter(settings))
        caption += (f" with a context of {_integer(n_ctx)} tokens (KV cache type {_esc(kv_type or '?')}, "
                    f"{_integer(gpu_layers)} layers on the GPU)")
    return (f'<section id="memory">\n<h2>Memory</h2>\n<p class="muted">{caption}.</p>\n'
            f'<div class="scroll"><table>\n<thead><tr>{header}</tr></thead>\n<tbody>\n'
            + "\n".join(rows) + "\n</tbody>\n</table></div>\n</section>")


def heatmap_section(report: Report) -> str:
    """The sample paragraph once per candidate, each token coloured by that candidate's KLD there."""
    sample = report.get("sample") or {}
    tokens = list(sample.get("tokens") or [])
    runs = [run for run in sample.get("candidates") or [] if run.get("kld") is not None]
    if not tokens or not runs:
        return ""
    names = _short_names(report)
    pooled = [v for run in runs for v in (_finite(x) for x in run["kld"]) if v is not None]
    scale = heat_scale(pooled)
    maps = "\n".join(heatmap(names.get(run.get("name"), run.get("name")), run.get("name"), tokens, run["kld"],
                             scale, is_open=index == 0)
                     for index, run in enumerate(runs))
    return (
        '<section id="sample">\n<h2>Where the variants disagree</h2>\n'
        '<p class="muted">A sample paragraph, each token coloured by the KL divergence between the reference\'s '
        "and the variant's next-token distributions at that token. Hover a token to read its value.</p>\n"
        f"{heat_legend(scale)}\n{maps}\n</section>"
    )


def notes_section(report: Report) -> str:
    """Each candidate's notes (a different vocabulary, a skipped measurement, …)."""
    names = _short_names(report)
    blocks = []
    for candidate in _candidates(report):
        notes = [note for note in candidate.get("notes") or [] if note]
        if notes:
            items = "".join(f"<li>{_esc(note)}</li>" for note in notes)
            blocks.append(f'<h3 title="{_esc(candidate.get("name"))}">{_esc(names.get(candidate.get("name")))}</h3>'
                          f"<ul>{items}</ul>")
    if not blocks:
        return ""
    return '<section id="notes">\n<h2>Notes</h2>\n' + "\n".join(blocks) + "\n</section>"


# --- summary ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SummaryContext:
    """What every summary row needs besides its own entry."""

    reference: Mapping[str, Any]
    names: Mapping[Any, str]
    score_scale: float
    show_tasks: bool
    show_speed: bool


def _summary_row(entry: Mapping[str, Any], context: SummaryContext, *, is_reference: bool = False) -> str:
    reference, scale = context.reference, context.score_scale
    show_tasks, show_speed = context.show_tasks, context.show_speed
    name = (f'<th scope="row"><span class="name">{_esc(context.names.get(entry.get("name"), entry.get("name")))}'
            + ('<span class="tag">reference</span>' if is_reference else "")
            + f'</span><span class="path">{_esc(entry.get("name"))}</span></th>')
    cells = [_number_cell(_megabytes(entry.get("bytes"))), _number_cell(_fixed(entry.get("bpw"), 2)),
             _number_cell(_fixed(entry.get("ppl"), 3))]
    if is_reference:
        cells.append(f'<td class="num">{MISSING}</td>')
        cells.extend(f'<td class="num muted">{MISSING}</td>' for _ in range(6))
    else:
        cells.append(_number_cell(_signed_percent(_relative_change(entry.get("ppl"), reference.get("ppl")))))
        no_kld = _esc(_why_no_kld(entry))
        if _finite(entry.get("kld_mean")) is None:
            cells.append(f'<td class="muted no-kld" colspan="4">{no_kld}</td>')
        else:
            cells.extend(f'<td class="num">{_significant(entry.get(key))}</td>'
                         for key in ("kld_mean", "kld_median", "kld_p99", "kld_max"))
        cells.append(f'<td class="num">{_percent(entry.get("top1_agreement"))}</td>')
        cells.append(f'<td class="num">{_signed_percent(_scaled(entry.get("delta_p_mean"), 100.0))}</td>')
    if show_tasks:
        tasks = entry.get("tasks") or {}
        cells.append(f'<td class="num">{_score(tasks.get("score"), scale)}</td>')
        cells.append(f"<td>{_badge(tasks.get('recommendation'))}</td>")
    if show_speed:
        speed = entry.get("speed") or {}
        cells.append(_number_cell(_rate(speed.get("prompt_tps"))))
        cells.append(_number_cell(_rate(speed.get("generation_tps"))))
    return f'<tr{REFERENCE_ROW if is_reference else ""}>{name}{"".join(cells)}</tr>'


def _number_cell(text: str) -> str:
    return f'<td class="num">{text}</td>'


SUMMARY_GLOSSARY = (
    '<p class="glossary">KLD: KL(P<sub>reference</sub> ‖ P<sub>variant</sub>) of the next-token distributions, '
    "in nats per token; 0 means identical predictions. Top-1 agree: how often both models put the same token "
    "first. Δp mean: the mean change in the probability given to the text's actual next token. ΔPPL: perplexity "
    "relative to the reference's.</p>"
)


def _why_no_kld(candidate: Mapping[str, Any]) -> str:
    if candidate.get("same_vocab") is False:
        return "different vocabulary, so no KLD against the reference"
    return "KLD not measured"


# --- chart ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Axis:
    """A value range drawn onto a pixel range, linear or logarithmic, with its tick values."""

    low: float
    high: float
    ticks: tuple[float, ...]
    log: bool = False

    def fraction(self, value: float) -> float:
        if self.log:
            value = max(value, self.low)
            return (math.log10(value) - math.log10(self.low)) / (math.log10(self.high) - math.log10(self.low))
        return (value - self.low) / (self.high - self.low)


def size_axis(megabytes: Sequence[float]) -> Axis:
    """From 0 MB to a round number above the largest size."""
    high, ticks = _linear_ticks(max(megabytes) * 1.04 if megabytes else 1.0)
    return Axis(0.0, high, ticks)


def kld_axis(values: Sequence[float]) -> Axis:
    """Linear from 0, or logarithmic in decades when the values span more than LOG_SCALE_SPAN.

    On a log axis a KLD of 0 (a variant compared with itself) sits on the axis floor, a decade below the
    smallest positive value.
    """
    positive = [v for v in values if v > 0]
    if len(positive) >= 2 and max(positive) / min(positive) > LOG_SCALE_SPAN:
        return _log_axis(positive, has_zero=len(positive) < len(values))
    high, ticks = _linear_ticks(max(positive) * 1.1 if positive else 0.01)
    return Axis(0.0, high, ticks)


def _log_axis(positive: Sequence[float], *, has_zero: bool) -> Axis:
    low_exponent = math.floor(math.log10(min(positive))) - (1 if has_zero else 0)
    high_exponent = math.ceil(math.log10(max(positive)))
    decades = range(low_exponent, high_exponent + 1)
    multiples = (1, 2, 5) if high_exponent - low_exponent <= 2 else (1,)
    ticks = tuple(m * 10.0 ** e for e in decades for m in multiples if m * 10.0 ** e <= 10.0 ** high_exponent)
    return Axis(10.0 ** low_exponent, 10.0 ** high_exponent, ticks, log=True)


def _linear_ticks(high: float, count: int = 5) -> tuple[float, tuple[float, ...]]:
    raw = high / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if raw <= m * magnitude)
    steps = math.ceil(high / step - 1e-9)
    return steps * step, tuple(round(i * step, 12) for i in range(steps + 1))


def chart_svg(candidates: Sequence[Mapping[str, Any]], names: Mapping[str, str], reference_bytes: float | None) -> str:
    """An inline SVG scatter plot: file size (MB) across, mean KLD up, one labelled point per candidate."""
    sizes = [c["bytes"] / 1e6 for c in candidates]
    klds = [max(0.0, float(c["kld_mean"])) for c in candidates]  # rounding can leave a self-comparison at -1e-9
    x_axis = size_axis([*sizes, *([reference_bytes / 1e6] if reference_bytes else [])])
    y_axis = kld_axis(klds)

    def x_pixel(megabytes: float) -> float:
        return PLOT_LEFT + x_axis.fraction(megabytes) * (PLOT_RIGHT - PLOT_LEFT)

    def y_pixel(kld: float) -> float:
        return PLOT_BOTTOM - y_axis.fraction(kld) * (PLOT_BOTTOM - PLOT_TOP)

    parts = [_svg_grid(x_axis, y_axis, x_pixel, y_pixel)]
    if reference_bytes:
        x = x_pixel(reference_bytes / 1e6)
        parts.append(f'<line class="reference-line" x1="{x:.1f}" x2="{x:.1f}" y1="{PLOT_TOP}" y2="{PLOT_BOTTOM}"/>'
                     f'<text class="reference-label" x="{x - 4:.1f}" y="{PLOT_TOP + 12}" text-anchor="end">'
                     "reference size</text>")
    points = [(x_pixel(size), y_pixel(kld)) for size, kld in zip(sizes, klds, strict=True)]
    labels = [str(names.get(c.get("name"), c.get("name"))) + (" (KLD 0)" if kld == 0 and y_axis.log else "")
              for c, kld in zip(candidates, klds, strict=True)]
    placements = place_labels(points, labels)
    for candidate, (x, y), kld, size, label, (lx, ly, anchor) in zip(
            candidates, points, klds, sizes, labels, placements, strict=True):
        verdict = ((candidate.get("tasks") or {}).get("recommendation") or "none")
        clamped = " clamped" if kld == 0 and y_axis.log else ""
        tooltip = f"{candidate.get('name')}: {_megabytes(size * 1e6)} MB, mean KLD {_significant(kld)} nats"
        parts.append(f'<circle class="point {_css_token(verdict)}{clamped}" cx="{x:.1f}" cy="{y:.1f}" r="5">'
                     f"<title>{_esc(tooltip)}</title></circle>"
                     f'<text class="point-label" x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}">{_esc(label)}</text>')
    y_title = "mean KLD vs reference (nats" + (", log scale)" if y_axis.log else ")")
    parts.append(f'<text class="axis-title" x="{(PLOT_LEFT + PLOT_RIGHT) / 2:.0f}" y="{CHART_HEIGHT - 12}" '
                 'text-anchor="middle">file size (MB)</text>'
                 f'<text class="axis-title" transform="translate(16 {(PLOT_TOP + PLOT_BOTTOM) / 2:.0f}) rotate(-90)" '
                 f'text-anchor="middle">{y_title}</text>')
    return (f'<svg class="chart" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img" '
            f'aria-label="File size against mean KLD for {len(candidates)} variants">' + "".join(parts) + "</svg>")


def _svg_grid(x_axis: Axis, y_axis: Axis, x_pixel: Any, y_pixel: Any) -> str:
    parts = []
    for tick in x_axis.ticks:
        x = x_pixel(tick)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{PLOT_TOP}" y2="{PLOT_BOTTOM}"/>'
                     f'<text class="tick" x="{x:.1f}" y="{PLOT_BOTTOM + 18}" text-anchor="middle">'
                     f"{_tick_label(tick)}</text>")
    for tick in y_axis.ticks:
        y = y_pixel(tick)
        minor = " minor" if y_axis.log and not _is_decade(tick) else ""
        parts.append(f'<line class="grid{minor}" x1="{PLOT_LEFT}" x2="{PLOT_RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="tick" x="{PLOT_LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">'
                     f"{_tick_label(tick)}</text>")
    parts.append(f'<rect class="frame" x="{PLOT_LEFT}" y="{PLOT_TOP}" width="{PLOT_RIGHT - PLOT_LEFT}" '
                 f'height="{PLOT_BOTTOM - PLOT_TOP}"/>')
    return "".join(parts)


def place_labels(points: Sequence[tuple[float, float]], labels: Sequence[str]) -> list[tuple[float, float, str]]:
    """For each point a label position (x, y, text-anchor) that overlaps no point or earlier label if it can."""
    taken: list[tuple[float, float, float, float]] = [(x - 6, y - 6, x + 6, y + 6) for x, y in points]
    placed = []
    for (x, y), label in zip(points, labels, strict=True):
        width = LABEL_CHAR_PX * len(label)
        options = [(x + 9, y + 4, "start"), (x - 9, y + 4, "end"), (x, y - 10, "middle"), (x, y + 18, "middle"),
                   (x + 9, y - 10, "start"), (x + 9, y + 18, "start"), (x - 9, y - 10, "end"), (x - 9, y + 18, "end")]
        choice = next((option for option in options
                       if _inside_plot(box := _label_box(option, width)) and not any(_overlaps(box, t) for t in taken)),
                      None)
        if choice is None:
            choice = next((o for o in options if _inside_plot(_label_box(o, width))), options[0])
        taken.append(_label_box(choice, width))
        placed.append(choice)
    return placed


def _label_box(option: tuple[float, float, str], width: float) -> tuple[float, float, float, float]:
    x, y, anchor = option
    left = x if anchor == "start" else x - width if anchor == "end" else x - width / 2
    return left, y - 11, left + width, y + 3


def _inside_plot(box: tuple[float, float, float, float]) -> bool:
    return box[0] >= PLOT_LEFT + 2 and box[2] <= PLOT_RIGHT - 2 and box[1] >= PLOT_TOP + 2 and box[3] <= PLOT_BOTTOM - 2


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _chart_caption(plotted: Sequence[Mapping[str, Any]]) -> str:
    caption = "Lower and further left is better: smaller files that predict like the reference."
    if any(_finite(c.get("kld_mean")) == 0 for c in plotted) and kld_axis([float(c["kld_mean"]) for c in plotted]).log:
        caption += " A KLD of 0 (identical predictions) is drawn hollow on the axis floor."
    if any(c.get("tasks") for c in plotted):
        caption += (' <span class="key"><span class="dot deploy"></span>deploy</span>'
                    '<span class="key"><span class="dot investigate"></span>investigate</span>'
                    '<span class="key"><span class="dot none"></span>no task score</span>')
    return caption


def _tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:g}"


def _is_decade(value: float) -> bool:
    exponent = math.log10(value)
    return abs(exponent - round(exponent)) < 1e-9


# --- tasks ------------------------------------------------------------------------------------------------------

def _suite_names(reference_tasks: Mapping[str, Any], scored: Sequence[Mapping[str, Any]]) -> list[str]:
    names: dict[str, None] = dict.fromkeys(reference_tasks.get("by_suite") or {})
    for candidate in scored:
        names.update(dict.fromkeys(candidate["tasks"].get("by_suite") or {}))
    return list(names)


def _suite_reference_score(suite: str, reference_tasks: Mapping[str, Any],
                           scored: Sequence[Mapping[str, Any]]) -> float | None:
    by_suite = reference_tasks.get("by_suite") or {}
    if suite in by_suite:
        return by_suite[suite]
    for candidate in scored:
        entry = (candidate["tasks"].get("by_suite") or {}).get(suite)
        if entry and entry.get("reference_score") is not None:
            return entry["reference_score"]
    return None


def _suite_cell(candidate: Mapping[str, Any], suite: str, scale: float) -> str:
    entry = ((candidate.get("tasks") or {}).get("by_suite") or {}).get(suite)
    if not entry:
        return f'<td class="num muted">{MISSING}</td>'
    degradation = _degradation(entry.get("score"), entry.get("reference_score"))
    return f'<td class="num">{_score(entry.get("score"), scale)}{_change_note(degradation, None)}</td>'


def _overall_cell(candidate: Mapping[str, Any], scale: float) -> str:
    tasks = candidate.get("tasks")
    if not tasks:
        return f'<td class="num muted">{MISSING}</td>'
    degradation = tasks.get("degradation_pct")
    if degradation is None:
        degradation = _degradation(tasks.get("score"), tasks.get("reference_score"))
    return (f'<td class="num strong">{_score(tasks.get("score"), scale)}'
            f'{_change_note(degradation, tasks.get("threshold_pct"))}</td>')


def _verdict_cell(candidate: Mapping[str, Any]) -> str:
    tasks = candidate.get("tasks")
    if not tasks:
        return "<td></td>"
    threshold = _finite(tasks.get("threshold_pct"))
    limit = f'<span class="sub">at most {_fixed(threshold, 1)} % worse</span>' if threshold is not None else ""
    return f'<td class="num">{_badge(tasks.get("recommendation"))}{limit}</td>'


def _degradation(score: Any, reference_score: Any) -> float | None:
    score, reference_score = _finite(score), _finite(reference_score)
    if score is None or not reference_score:
        return None
    return (reference_score - score) / reference_score * 100.0


def _change_note(degradation: Any, threshold: Any) -> str:
    value = _finite(degradation)
    if value is None:
        return ""
    limit = _finite(threshold)
    tone = " bad" if limit is not None and value > limit else ""
    if abs(value) < 0.05:
        words = "no change"
    elif value > 0:
        words = f"{_fixed(value, 1)} % worse"
    else:
        words = f"{_fixed(-value, 1)} % better"
    return f'<span class="sub{tone}">{words}</span>'


def _tasks_caption(reference_tasks: Mapping[str, Any], scored: Sequence[Mapping[str, Any]]) -> str:
    suite = reference_tasks.get("suite") or next((c["tasks"].get("suite") for c in scored), None)
    caption = f"Suite {_esc(suite)}" if suite else "Task suite"
    if reference_tasks.get("items"):
        caption += f", {_integer(reference_tasks['items'])} items"
        if reference_tasks.get("passed") is not None:
            caption += f" (the reference passes {_integer(reference_tasks['passed'])})"
    return caption + ". Each change is relative to the reference's score on the same suite."


def _score_scale(report: Report) -> float:
    """100 when every task score in the report is a fraction (shown as a percentage), else 1 (shown as given)."""
    scores: list[float] = []
    reference_tasks = (report.get("reference") or {}).get("tasks") or {}
    scores.extend(v for v in [reference_tasks.get("score"), *(reference_tasks.get("by_suite") or {}).values()])
    for candidate in _candidates(report):
        tasks = candidate.get("tasks") or {}
        scores.extend([tasks.get("score"), tasks.get("reference_score")])
        for entry in (tasks.get("by_suite") or {}).values():
            scores.extend([entry.get("score"), entry.get("reference_score")])
    finite = [v for v in (_finite(s) for s in scores) if v is not None]
    return 100.0 if finite and all(0.0 <= v <= 1.0 for v in finite) else 1.0


def _score(value: Any, scale: float) -> str:
    number = _finite(value)
    if number is None:
        return MISSING
    return f"{number * 100:.1f} %" if scale == 100.0 else _significant(number)


def _badge(recommendation: Any) -> str:
    if not recommendation:
        return ""
    return f'<span class="badge {_css_token(str(recommendation))}">{_esc(recommendation)}</span>'


# --- heat map ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeatScale:
    """KLD values from 0 to `cap` spread over HEAT_BINS colour steps; `basis` says where the cap comes from."""

    cap: float
    basis: str

    def step(self, value: float) -> int:
        return min(HEAT_BINS - 1, int(value / self.cap * HEAT_BINS)) if value > 0 else 0


def heat_scale(values: Sequence[float]) -> HeatScale:
    """Full colour at the 99th percentile of all the sample's values, but never below HEAT_CAP_FLOOR nats."""
    percentile = _percentile(values, HEAT_PERCENTILE) if values else 0.0
    if percentile >= HEAT_CAP_FLOOR:
        return HeatScale(percentile, "the 99th percentile of the sample's per-token KLD, over all variants")
    return HeatScale(HEAT_CAP_FLOOR, f"a fixed floor of {HEAT_CAP_FLOOR:g} nats (the sample's 99th percentile, "
                                     f"{_significant(percentile)}, is below it)")


def heat_legend(scale: HeatScale) -> str:
    """The colour steps with their value ranges, and where the top of the scale comes from."""
    width = scale.cap / HEAT_BINS
    steps = []
    for step in range(HEAT_BINS):
        low, high = _significant(step * width, 3), _significant((step + 1) * width, 3)
        text = f"≥ {low}" if step == HEAT_BINS - 1 else f"{low}–{high}"
        steps.append(f'<span class="swatch h{step}" title="KLD {text} nats">{text}</span>')
    return (f'<div class="legend"><span class="legend-title">KLD (nats)</span>{"".join(steps)}</div>\n'
            f'<p class="muted small">Full colour at {_significant(scale.cap)} nats: {_esc(scale.basis)}. '
            "Higher values share the strongest colour.</p>")


def heatmap(label: str, full_name: Any, tokens: Sequence[Any], klds: Sequence[Any], scale: HeatScale, *,
            is_open: bool) -> str:
    """One candidate's heat map in a collapsible block: one span per token, its KLD in the hover title."""
    values = [_finite(k) for k in klds]
    spans = "".join(token_span(index, token, values[index] if index < len(values) else None, scale)
                    for index, token in enumerate(tokens))
    measured = [v for v in values[: len(tokens)] if v is not None]
    stats = (f"mean {_significant(sum(measured) / len(measured))}, max {_significant(max(measured))} nats over "
             f"{len(measured)} tokens" if measured else "no values")
    return (f'<details class="heatmap"{" open" if is_open else ""}>'
            f'<summary><strong title="{_esc(full_name)}">{_esc(label)}</strong> '
            f'<span class="muted">{stats}</span></summary>\n'
            f'<div class="sample">{spans}</div></details>')


def token_span(index: int, token: Any, kld: float | None, scale: HeatScale) -> str:
    """A token as a coloured span; a newline piece ends with a visible ↵ and a line break after the span."""
    piece = "" if token is None else str(token)
    if kld is None:
        css, value = "t missing", "not measured"
    else:
        css, value = f"t h{scale.step(kld)}", f"{_significant(kld)} nats"
    title = f"#{index} {_visible(piece, for_title=True)} · KLD {value}"
    shown = _visible(piece) or "∅"
    empty = " empty" if not piece else ""
    span = f'<span class="{css}{empty}" title="{_esc(title)}">{_esc(shown)}</span>'
    return span + "<br>" * piece.count("\n")


_VISIBLE = {"\n": "↵", "\r": "␍", "\t": "→\t"}


def _visible(piece: str, *, for_title: bool = False) -> str:
    """Whitespace and control characters made visible; spaces kept (the page shows them with pre-wrap)."""
    out = []
    for char in piece:
        if char in _VISIBLE:
            out.append("→" if for_title and char == "\t" else _VISIBLE[char])
        elif ord(char) < 0x20:
            out.append(chr(0x2400 + ord(char)))
        elif ord(char) == 0x7F:
            out.append("␡")
        elif char == " " and for_title:
            out.append("␣")
        else:
            out.append(char)
    return "".join(out)


def _percentile(values: Sequence[float], percent: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * percent / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


# --- header and footer ------------------------------------------------------------------------------------------

def _text_description(text: Mapping[str, Any]) -> str:
    described = f"{_integer(text.get('tokens'))} tokens"
    if text.get("chunks"):
        described += f" in {_integer(text['chunks'])} chunks"
        if text.get("ctx"):
            described += f" of {_integer(text['ctx'])}"
    sources = [str(s) for s in text.get("sources") or []]
    if sources:
        described += " from " + ", ".join(f'<span class="path inline">{_esc(s)}</span>' for s in sources)
    return described


def _display_date(created: Any) -> str:
    try:
        moment = datetime.fromisoformat(str(created))
    except ValueError:
        return str(created)
    zone = " UTC" if moment.utcoffset() is not None and not moment.utcoffset() else ""
    return moment.strftime("%Y-%m-%d %H:%M") + zone


def _footer() -> str:
    return (f'<footer>Made by qdesk {_esc(qdesk.__version__)}. This page is self-contained: the data behind it is '
            "in the JSON file of the same name.</footer>")


# --- names and values -------------------------------------------------------------------------------------------

def _candidates(report: Report) -> list[Mapping[str, Any]]:
    return [c for c in report.get("candidates") or [] if c]


def _short_names(report: Report) -> dict[Any, str]:
    """Each name without `.gguf` and without the words it shares with the reference's ("SmolLM2-135M-…-Q4_K_M" →
    "Q4_K_M"); without a reference, without the words all names share. Full names where short ones would clash."""
    full = [entry.get("name") for entry in [report.get("reference") or {}, *_candidates(report)] if entry.get("name")]
    full += [run.get("name") for run in (report.get("sample") or {}).get("candidates") or [] if run.get("name")]
    stems = {name: _strip_suffix(str(name)) for name in full}
    reference_name = (report.get("reference") or {}).get("name")
    if reference_name:
        anchor = _strip_suffix(str(reference_name))
        short = {name: stem[len(_common_word_prefix([stem, anchor])):] for name, stem in stems.items()}
    else:
        prefix = _common_word_prefix(list(set(stems.values()))) if len(set(stems.values())) > 1 else ""
        short = {name: stem[len(prefix):] for name, stem in stems.items()}
    short = {name: text or stems[name] for name, text in short.items()}
    if len(set(short.values())) < len(set(stems.values())):
        return stems
    return short


def _strip_suffix(name: str) -> str:
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def _common_word_prefix(names: Sequence[str]) -> str:
    """The longest prefix all names share that ends with a separator (-, _, . or space)."""
    shortest = min(names, key=len)
    length = 0
    while length < len(shortest) and all(n[length] == shortest[length] for n in names):
        length += 1
    cut = max(shortest.rfind(separator, 0, length) for separator in "-_. ")
    return shortest[: cut + 1] if cut >= 0 else ""


def _css_token(value: str) -> str:
    return "".join(ch for ch in value.lower() if ch.isalnum() or ch == "-") or "none"


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _not_finite_text(value: Any) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return MISSING


def _fixed(value: Any, digits: int) -> str:
    number = _finite(value)
    return _not_finite_text(value) if number is None else f"{number:,.{digits}f}".replace("-", "−")


def _significant(value: Any, digits: int = 4) -> str:
    number = _finite(value)
    if number is None:
        return _not_finite_text(value)
    return "0" if number == 0 else f"{number:.{digits}g}".replace("-", "−")


def _integer(value: Any) -> str:
    number = _finite(value)
    return MISSING if number is None else f"{number:,.0f}"


def _megabytes(value: Any) -> str:
    number = _finite(value)
    if number is None:
        return MISSING
    megabytes = number / 1e6
    return f"{megabytes:,.2f}" if megabytes < 10 else f"{megabytes:,.1f}"


def _rate(tokens_per_second: Any) -> str:
    number = _finite(tokens_per_second)
    return _fixed(number, 0 if number is not None and number >= 100 else 1)


def _percent(fraction: Any) -> str:
    number = _finite(fraction)
    return _not_finite_text(fraction) if number is None else f"{number * 100:.2f} %"


def _signed_percent(value: Any) -> str:
    number = _finite(value)
    return _not_finite_text(value) if number is None else f"{number:+.2f} %".replace("-", "−")


def _scaled(value: Any, factor: float) -> float | None:
    number = _finite(value)
    return None if number is None else number * factor


def _relative_change(value: Any, reference: Any) -> float | None:
    value, reference = _finite(value), _finite(reference)
    if value is None or not reference:
        return None
    return (value - reference) / reference * 100.0


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


# --- style ------------------------------------------------------------------------------------------------------

PRINT_SCRIPT = ("<script>addEventListener('beforeprint',function(){document.querySelectorAll('details')"
                ".forEach(function(d){d.open=true})})</script>")

_LIGHT = """
  --bg:#ffffff; --fg:#1c2026; --muted:#5d6570; --line:#dde1e6; --panel:#f5f7f9; --accent:#2a64c9;
  --good:#17803d; --good-bg:#e3f4e8; --warn:#a94e00; --warn-bg:#fdeedd; --none:#8a929c;
  --h1:#ffeda0; --h2:#fed976; --h3:#feb24c; --h4:#fd8d3c; --h5:#f03b20; --h6:#c8141e; --h7:#8c0026;
  --h1-fg:#1c2026; --h2-fg:#1c2026; --h3-fg:#1c2026; --h4-fg:#1c2026; --h5-fg:#ffffff; --h6-fg:#ffffff;
  --h7-fg:#ffffff;"""

_DARK = """
  --bg:#15181c; --fg:#e4e7eb; --muted:#98a1ac; --line:#2e343c; --panel:#1d2126; --accent:#7aa7ff;
  --good:#5fd08a; --good-bg:#183524; --warn:#ffad5c; --warn-bg:#3b2614; --none:#8a929c;
  --h1:#3b1d5e; --h2:#5c2073; --h3:#84287e; --h4:#ad3576; --h5:#d64d66; --h6:#f1775c; --h7:#fcb17e;
  --h1-fg:#e4e7eb; --h2-fg:#e4e7eb; --h3-fg:#ffffff; --h4-fg:#ffffff; --h5-fg:#ffffff; --h6-fg:#15181c;
  --h7-fg:#15181c;"""

STYLE = (
    f":root{{color-scheme:light dark;{_LIGHT}}}\n"
    f"@media (prefers-color-scheme: dark){{:root{{{_DARK}}}}}\n"
    f"@media print{{:root{{color-scheme:light;{_LIGHT}}}}}\n"
    + """
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1280px;margin:0 auto;padding:28px 24px 48px}
h1{font-size:26px;margin:0 0 2px;letter-spacing:-0.01em}
h2{font-size:19px;margin:36px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:15px;margin:16px 0 4px}
.lede{margin:0 0 14px;color:var(--muted)}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 18px;margin:0;padding:12px 16px;
  background:var(--panel);border:1px solid var(--line);border-radius:8px}
.facts dt{color:var(--muted)} .facts dd{margin:0;min-width:0}
.path{display:block;font:11.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:var(--muted);
  overflow-wrap:anywhere}
.path.inline{display:inline}
.muted{color:var(--muted)} .small{font-size:13px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px;font-variant-numeric:tabular-nums}
th,td{padding:6px 7px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{font-weight:600;color:var(--muted);font-size:12.5px;border-bottom:2px solid var(--line);
  vertical-align:bottom}
thead th,thead th.num{white-space:normal}
td.no-kld{white-space:normal;text-align:left}
th.group{text-align:center;border-bottom:1px solid var(--line)}
.num{text-align:right;white-space:nowrap}
tbody th{font-weight:600}
tr.reference{background:var(--panel)}
tr.total th,tr.total td{border-top:2px solid var(--line)}
.strong{font-weight:600}
.name{overflow-wrap:anywhere}
table.summary tbody th{min-width:10em;max-width:16em}
.tag{display:inline-block;margin-left:8px;padding:0 6px;border-radius:4px;font-size:11px;font-weight:500;
  color:var(--muted);border:1px solid var(--line)}
.sub{display:block;font-size:12px;color:var(--muted);font-weight:400}
.sub.bad{color:var(--warn)}
.badge{display:inline-block;padding:1px 8px;border-radius:999px;font-size:12px;font-weight:600;
  border:1px solid currentColor}
.badge.deploy{color:var(--good);background:var(--good-bg)}
.badge.investigate{color:var(--warn);background:var(--warn-bg)}
.glossary{font-size:13px;color:var(--muted);margin:8px 0 0}
figure{margin:0}
svg.chart{display:block;width:100%;max-width:760px;height:auto;font-size:12px}
svg .grid{stroke:var(--line);stroke-width:1} svg .grid.minor{stroke-dasharray:2 3}
svg .frame{fill:none;stroke:var(--muted);stroke-width:1}
svg .tick,svg .axis-title{fill:var(--muted)} svg .axis-title{font-size:13px}
svg .point{fill:var(--accent);stroke:var(--bg);stroke-width:1.5}
svg .point.deploy{fill:var(--good)} svg .point.investigate{fill:var(--warn)} svg .point.none{fill:var(--accent)}
svg .point.clamped{fill:var(--bg);stroke:var(--accent);stroke-width:2}
svg .point-label{fill:var(--fg);font-weight:600}
svg .reference-line{stroke:var(--muted);stroke-dasharray:5 4}
svg .reference-label{fill:var(--muted);font-size:11px}
figcaption{font-size:13px;color:var(--muted);margin-top:6px}
.key{margin-left:12px;white-space:nowrap}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:4px;vertical-align:baseline}
.dot.deploy{background:var(--good)} .dot.investigate{background:var(--warn)} .dot.none{background:var(--accent)}
.unplotted{margin-top:4px}
.legend{display:flex;flex-wrap:wrap;align-items:center;gap:0;margin:8px 0 2px;font-size:12px}
.legend-title{margin-right:10px;color:var(--muted)}
.swatch{padding:2px 8px;border:1px solid var(--line);margin-left:-1px;font-variant-numeric:tabular-nums}
details.heatmap{border:1px solid var(--line);border-radius:8px;margin:10px 0;background:var(--panel)}
details.heatmap>summary{cursor:pointer;padding:8px 14px}
.sample{padding:10px 14px 14px;background:var(--bg);border-top:1px solid var(--line);border-radius:0 0 8px 8px;
  font:14px/1.9 ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;white-space:pre-wrap;
  overflow-wrap:anywhere;tab-size:4}
.t{border-radius:2px;padding:1px 0}
.t:hover{outline:1px solid var(--fg)}
.t.empty,.t.missing{color:var(--muted)}
.t.missing{text-decoration:underline dotted}
.h0{background:transparent}
.h1{background:var(--h1);color:var(--h1-fg)} .h2{background:var(--h2);color:var(--h2-fg)}
.h3{background:var(--h3);color:var(--h3-fg)} .h4{background:var(--h4);color:var(--h4-fg)}
.h5{background:var(--h5);color:var(--h5-fg)} .h6{background:var(--h6);color:var(--h6-fg)}
.h7{background:var(--h7);color:var(--h7-fg)}
.reasons{font-size:14px}
footer{margin-top:40px;font-size:12px;color:var(--muted)}
@media print{
  body{font-size:11pt} main{max-width:none;padding:0}
  .scroll{overflow:visible}
  h2{break-after:avoid} tr,figure,.legend{break-inside:avoid}
  details.heatmap{break-inside:auto}
  .badge,.swatch,.t,tr.reference,.dot{-webkit-print-color-adjust:exact;print-color-adjust:exact}
}
"""
)
