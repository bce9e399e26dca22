"""The evaluation report: one self-contained HTML page, and the JSON document behind it.

`render_html(report)` turns the document `qdesk eval` produces (see docs/report.md for its shape) into one
HTML page that needs nothing from the network: inline CSS, an inline SVG chart, and one line of script that only
opens the collapsed heat maps before printing. It has a header (reference, text, date, qdesk version), a summary
table of the candidates, a size-vs-KLD chart, the task table, the memory table, per-token KLD heat maps over a
sample paragraph, and each candidate's notes; parts the document lacks are left out, headings included.

The page is the Jinja2 template `resources/report/report.html.j2` (its style in `report.css` beside it), rendered
with autoescaping: every string from the document (file names, token pieces) is escaped, and whitespace in token
pieces is shown. This module shapes the document into the template's view; the figures and names come from
`report_model`, which the desktop app's Evaluate section shares.

`write_report(report, "eval.html")` writes `eval.html` and `eval.json` beside it, each complete or not at all.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

import qdesk
from converters.core.atomic import atomic_output
from converters.core.errors import OutputError
from converters.core.outputs import check_outputs
from converters.core.paths import resources_dir
from qdesk.evaluation import report_model as model
from qdesk.evaluation.report_model import (
    MISSING,
    Report,
    candidates,
    change_words,
    degradation,
    finite,
    fixed,
    integer,
    megabytes,
    percent,
    rate,
    relative_change,
    scaled,
    score,
    score_scale,
    short_names,
    signed_percent,
    significant,
    suite_names,
    suite_reference_score,
    why_no_kld,
)

__all__ = ["render_html", "write_report"]

TEMPLATE_FOLDER = "report"
TEMPLATE_NAME = "report.html.j2"


# --- public API ------------------------------------------------------------------------------------------------

def render_html(report: Report) -> str:
    """The whole report as one HTML document that loads nothing from elsewhere."""
    return _template().render(page_view(report))


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
    return [entry["path"] for entry in models if isinstance(entry, Mapping) and isinstance(entry.get("path"), str)]


# --- the template ----------------------------------------------------------------------------------------------

def _escaped(value: Any) -> Any:
    """Every `{{ … }}` value as escaped text (None as nothing); markup the template made itself passes through.

    Escaping here rather than in markupsafe keeps the entities `html.escape` writes (&#x27; for ').
    """
    if value is None:
        return ""
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape(str(value), quote=True))


@cache
def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(resources_dir() / TEMPLATE_FOLDER),
        autoescape=True,
        finalize=_escaped,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(css_token=model.css_token, tick_label=model.tick_label, is_decade=model.is_decade,
                               significant=significant, visible=model.visible)
    environment.globals.update(token_title=model.token_title)
    return environment.get_template(TEMPLATE_NAME)


# --- the view ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """A table cell: its text, an optional verdict badge after it and a smaller note under it."""

    text: str = ""
    css: str = "num"
    colspan: int | None = None
    badge: str | None = None
    note: str | None = None
    note_bad: bool = False


MISSING_CELL = Cell(MISSING, "num muted")


def page_view(report: Report) -> dict[str, Any]:
    """Everything the template shows, each part None (or empty) when the document lacks it."""
    reference = report.get("reference") or {}
    return {
        "version": qdesk.__version__,
        "reference": {
            "present": bool(reference), "name": reference.get("name"), "path": reference.get("path"),
            "megabytes": megabytes(reference.get("bytes")), "bpw": fixed(reference.get("bpw"), 2),
            "ppl": fixed(reference.get("ppl"), 3),
        },
        "text": _text_view(report.get("text")),
        "created": model.display_date(report["created"]) if report.get("created") else None,
        "summary": summary_view(report),
        "chart": chart_view(report),
        "tasks": tasks_view(report),
        "memory": memory_view(report),
        "heat": model.heat_map(report),
        "notes": notes_view(report),
        "width": model.CHART_WIDTH,
        "height": model.CHART_HEIGHT,
        "plot": {"left": model.PLOT_LEFT, "right": model.PLOT_RIGHT, "top": model.PLOT_TOP,
                 "bottom": model.PLOT_BOTTOM},
    }


def _text_view(text: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not text:
        return None
    return {"tokens": integer(text.get("tokens")), "chunks": integer(text["chunks"]) if text.get("chunks") else None,
            "ctx": integer(text["ctx"]) if text.get("ctx") else None,
            "sources": [str(source) for source in text.get("sources") or []]}


def summary_view(report: Report) -> dict[str, Any] | None:
    """One row per variant: size, perplexity, KLD statistics, agreement, task verdict and speed."""
    reference = report.get("reference") or {}
    others = candidates(report)
    if not others and not reference:
        return None
    everyone = [reference, *others]
    show_tasks = any(entry.get("tasks") for entry in everyone)
    show_speed = any(entry.get("speed") for entry in everyone)
    names, scale = short_names(report), score_scale(report)
    rows = []
    for entry in everyone:
        if not entry:
            continue
        is_reference = entry is reference
        cells = [Cell(megabytes(entry.get("bytes"))), Cell(fixed(entry.get("bpw"), 2)),
                 Cell(fixed(entry.get("ppl"), 3))]
        if is_reference:
            cells += [Cell(MISSING), *[MISSING_CELL] * 6]
        else:
            cells.append(Cell(signed_percent(relative_change(entry.get("ppl"), reference.get("ppl")))))
            if finite(entry.get("kld_mean")) is None:
                cells.append(Cell(why_no_kld(entry), "muted no-kld", colspan=4))
            else:
                cells += [Cell(significant(entry.get(key))) for key in ("kld_mean", "kld_median", "kld_p99", "kld_max")]
            cells.append(Cell(percent(entry.get("top1_agreement"))))
            cells.append(Cell(signed_percent(scaled(entry.get("delta_p_mean"), 100.0))))
        if show_tasks:
            tasks = entry.get("tasks") or {}
            cells += [Cell(score(tasks.get("score"), scale)), Cell(css="", badge=tasks.get("recommendation"))]
        if show_speed:
            speed = entry.get("speed") or {}
            cells += [Cell(rate(speed.get("prompt_tps"))), Cell(rate(speed.get("generation_tps")))]
        rows.append({"is_reference": is_reference, "name": entry.get("name"),
                     "short_name": names.get(entry.get("name"), entry.get("name")), "cells": cells})
    return {"show_tasks": show_tasks, "show_speed": show_speed, "rows": rows}


def chart_view(report: Report) -> dict[str, Any] | None:
    """Size against mean KLD for every candidate that has a KLD; the others listed beneath."""
    everyone = candidates(report)
    if not everyone:
        return None
    names = short_names(report)
    plotted = model.plotted_candidates(report)
    layout = model.chart_layout(report)
    unplotted = [{"short_name": names.get(c.get("name"), c.get("name")), "megabytes": megabytes(c.get("bytes")),
                  "ppl": fixed(c.get("ppl"), 3), "why": why_no_kld(c)} for c in everyone if c not in plotted]
    return {"layout": layout, "unplotted": unplotted,
            "has_hollow": layout is not None and any(point.hollow for point in layout.points),
            "has_verdicts": any(c.get("tasks") for c in plotted)}


def tasks_view(report: Report) -> dict[str, Any] | None:
    """Task scores per suite for the reference and each candidate, with the change and the verdict."""
    reference_tasks = (report.get("reference") or {}).get("tasks") or {}
    everyone = candidates(report)
    scored = [c for c in everyone if c.get("tasks")]
    if not reference_tasks and not scored:
        return None
    names, scale = short_names(report), score_scale(report)
    rows = []
    for suite in suite_names(reference_tasks, scored):
        reference_score = suite_reference_score(suite, reference_tasks, scored)
        rows.append({"label": suite, "total": False, "reference": Cell(score(reference_score, scale)),
                     "cells": [_suite_cell(c, suite, scale) for c in everyone]})
    overall_reference = reference_tasks.get("score")
    if overall_reference is None and scored:
        overall_reference = scored[0]["tasks"].get("reference_score")
    rows.append({"label": "all", "total": True, "reference": Cell(score(overall_reference, scale)),
                 "cells": [_overall_cell(c, scale) for c in everyone]})
    rows.append({"label": "verdict", "total": False, "reference": Cell(css=""),
                 "cells": [_verdict_cell(c) for c in everyone]})
    return {"caption": _tasks_caption(reference_tasks, scored),
            "columns": [{"name": c.get("name"), "short_name": names.get(c.get("name"))} for c in everyone],
            "rows": rows,
            "reasons": [(names.get(c.get("name")), c["tasks"]["reason"]) for c in scored if c["tasks"].get("reason")]}


def _suite_cell(candidate: Mapping[str, Any], suite: str, scale: float) -> Cell:
    entry = ((candidate.get("tasks") or {}).get("by_suite") or {}).get(suite)
    if not entry:
        return MISSING_CELL
    change = change_words(degradation(entry.get("score"), entry.get("reference_score")))
    return Cell(score(entry.get("score"), scale), note=change)


def _overall_cell(candidate: Mapping[str, Any], scale: float) -> Cell:
    tasks = candidate.get("tasks")
    if not tasks:
        return MISSING_CELL
    change = tasks.get("degradation_pct")
    if change is None:
        change = degradation(tasks.get("score"), tasks.get("reference_score"))
    value, limit = finite(change), finite(tasks.get("threshold_pct"))
    return Cell(score(tasks.get("score"), scale), "num strong", note=change_words(change),
                note_bad=value is not None and limit is not None and value > limit)


def _verdict_cell(candidate: Mapping[str, Any]) -> Cell:
    tasks = candidate.get("tasks")
    if not tasks:
        return Cell(css="")
    threshold = finite(tasks.get("threshold_pct"))
    limit = f"at most {fixed(threshold, 1)} % worse" if threshold is not None else None
    return Cell(badge=tasks.get("recommendation"), note=limit)


def _tasks_caption(reference_tasks: Mapping[str, Any], scored: Sequence[Mapping[str, Any]]) -> str:
    suite = reference_tasks.get("suite") or next((c["tasks"].get("suite") for c in scored), None)
    caption = f"Suite {suite}" if suite else "Task suite"
    if reference_tasks.get("items"):
        caption += f", {integer(reference_tasks['items'])} items"
        if reference_tasks.get("passed") is not None:
            caption += f" (the reference passes {integer(reference_tasks['passed'])})"
    return caption + ". Each change is relative to the reference's score on the same suite."


def memory_view(report: Report) -> dict[str, Any] | None:
    """Estimated memory of each variant at the given context: weights, KV cache, compute buffers, total."""
    reference = report.get("reference") or {}
    everyone = [entry for entry in [reference, *candidates(report)] if entry.get("memory")]
    if not everyone:
        return None
    names = short_names(report)
    memories = [entry["memory"] for entry in everyone]
    settings = {(m.get("n_ctx"), m.get("kv_type"), m.get("n_gpu_layers")) for m in memories}
    uniform = len(settings) == 1
    show_devices = any(m.get("vram_bytes") for m in memories)
    rows = []
    for entry in everyone:
        memory = entry["memory"]
        cells = []
        if not uniform:
            cells += [Cell(integer(memory.get("n_ctx"))), Cell(memory.get("kv_type"), css=""),
                      Cell(integer(memory.get("n_gpu_layers")))]
        cells += [Cell(megabytes(memory.get(key))) for key in ("weights_bytes", "kv_bytes", "compute_bytes")]
        cells.append(Cell(megabytes(memory.get("total_bytes")), "num strong"))
        if show_devices:
            cells += [Cell(megabytes(memory.get(key))) for key in ("ram_bytes", "vram_bytes")]
        rows.append({"is_reference": entry is reference, "name": entry.get("name"),
                     "short_name": names.get(entry.get("name")), "cells": cells})
    caption = "Estimated memory to run each variant"
    if uniform:
        n_ctx, kv_type, gpu_layers = next(iter(settings))
        caption += (f" with a context of {integer(n_ctx)} tokens (KV cache type {kv_type or '?'}, "
                    f"{integer(gpu_layers)} layers on the GPU)")
    return {"uniform": uniform, "show_devices": show_devices, "rows": rows, "caption": caption}


def notes_view(report: Report) -> list[dict[str, Any]]:
    """Each candidate's notes (a different vocabulary, a skipped measurement, …)."""
    names = short_names(report)
    blocks = []
    for candidate in candidates(report):
        texts = [note for note in candidate.get("notes") or [] if note]
        if texts:
            blocks.append({"name": candidate.get("name"), "short_name": names.get(candidate.get("name")),
                           "texts": texts})
    return blocks


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value
