"""The Evaluate view's tables as rows of cells, shaped from the evaluation document (`Evaluation.to_json()`).

The same document feeds the HTML report (`qdesk.evaluation.report`); the figures are formatted by the report's own
helpers
so that the window and the saved page agree to the digit. Nothing here imports Qt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qdesk.evaluation.report import (
    MISSING,
    _candidates,
    _finite,
    _fixed,
    _megabytes,
    _percent,
    _rate,
    _relative_change,
    _score,
    _score_scale,
    _short_names,
    _signed_percent,
    _significant,
    _suite_names,
    _suite_reference_score,
    _why_no_kld,
)

Report = Mapping[str, Any]

NEUTRAL, GOOD, WARN, MUTED = "neutral", "good", "warn", "muted"


@dataclass(frozen=True)
class Cell:
    text: str
    tooltip: str = ""
    numeric: bool = False
    tone: str = NEUTRAL
    bold: bool = False


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    header_tooltips: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.rows


def _number(text: str, tooltip: str = "", *, tone: str = NEUTRAL, bold: bool = False) -> Cell:
    return Cell(text, tooltip, numeric=True, tone=tone if text != MISSING else MUTED, bold=bold)


def _name_cell(entry: Mapping[str, Any], names: Mapping[Any, str], *, is_reference: bool) -> Cell:
    short = str(names.get(entry.get("name"), entry.get("name") or MISSING))
    return Cell(short + (" (reference)" if is_reference else ""), str(entry.get("path") or entry.get("name") or ""),
                bold=is_reference)


def verdict_tone(recommendation: Any) -> str:
    return {"deploy": GOOD, "investigate": WARN}.get(str(recommendation), NEUTRAL)


def summary_table(report: Report) -> Table:
    """One row per model: size, bits per weight, perplexity and its change, mean and p99 KLD, top-1 agreement;
    a task verdict and speeds when the evaluation measured them."""
    reference = report.get("reference") or {}
    candidates = _candidates(report)
    if not reference and not candidates:
        return Table((), ())
    everyone = [reference, *candidates]
    show_tasks = any(entry.get("tasks") for entry in everyone)
    show_speed = any(entry.get("speed") for entry in everyone)
    names, scale = _short_names(report), _score_scale(report)
    headers = ["Variant", "Size (MB)", "Bits/weight", "Perplexity", "Perplexity change", "Drift (mean)",
               "Drift (worst 1%)", "Same top choice"]
    tips = ["", "File size in megabytes", "Bits per weight (bpw)",
            "Perplexity (PPL) over the evaluation text: how surprised the model is by it; lower is better",
            "ΔPPL: the perplexity relative to the reference's; closer to 0 is better",
            "Mean KLD: the KL divergence of the next-token predictions from the reference's, in nats per token; "
            "how far the variant drifts from the reference on average, lower is better",
            "p99 KLD: the 99th percentile of the per-token KL divergence; the drift on the worst 1% of tokens",
            "Top-1 agreement: how often both models rank the same token first"]
    if show_tasks:
        headers += ["Tasks", "Verdict"]
        tips += ["Share of task items answered correctly", "deploy or investigate, from the task scores"]
    if show_speed:
        headers += ["Prompt tok/s", "Gen tok/s"]
        tips += ["Prompt processing speed", "Generation speed"]
    rows = []
    for entry in everyone:
        if not entry:
            continue
        is_reference = entry is reference
        cells = [_name_cell(entry, names, is_reference=is_reference), _number(_megabytes(entry.get("bytes"))),
                 _number(_fixed(entry.get("bpw"), 2)), _number(_fixed(entry.get("ppl"), 3))]
        if is_reference:
            cells += [_number(MISSING)] * 4
        else:
            cells.append(_number(_signed_percent(_relative_change(entry.get("ppl"), reference.get("ppl")))))
            if _finite(entry.get("kld_mean")) is None:
                why = _why_no_kld(entry)
                cells += [Cell(MISSING, why, numeric=True, tone=MUTED)] * 2
            else:
                cells += [_number(_significant(entry.get("kld_mean"))), _number(_significant(entry.get("kld_p99")))]
            cells.append(_number(_percent(entry.get("top1_agreement"))))
        if show_tasks:
            tasks = entry.get("tasks") or {}
            cells.append(_number(_score(tasks.get("score"), scale)))
            recommendation = tasks.get("recommendation")
            cells.append(Cell(str(recommendation or ""), str(tasks.get("reason") or ""),
                              tone=verdict_tone(recommendation), bold=True))
        if show_speed:
            speed = entry.get("speed") or {}
            cells += [_number(_rate(speed.get("prompt_tps"))), _number(_rate(speed.get("generation_tps")))]
        rows.append(tuple(cells))
    return Table(tuple(headers), tuple(rows), tuple(tips))


def tasks_table(report: Report) -> Table:
    """One row per model: its score on each suite, overall, the change against the reference and the verdict."""
    reference = report.get("reference") or {}
    reference_tasks = reference.get("tasks") or {}
    scored = [candidate for candidate in _candidates(report) if candidate.get("tasks")]
    if not reference_tasks and not scored:
        return Table((), ())
    names, scale = _short_names(report), _score_scale(report)
    suites = _suite_names(reference_tasks, scored)
    headers = ("Variant", *suites, "All", "Change", "Recommendation")
    rows = []
    if reference:
        overall = reference_tasks.get("score")
        if overall is None and scored:
            overall = scored[0]["tasks"].get("reference_score")
        rows.append((_name_cell(reference, names, is_reference=True),
                     *(_number(_score(_suite_reference_score(suite, reference_tasks, scored), scale))
                       for suite in suites),
                     _number(_score(overall, scale), bold=True), _number(MISSING), Cell("")))
    for candidate in scored:
        tasks = candidate["tasks"]
        by_suite = tasks.get("by_suite") or {}
        recommendation = tasks.get("recommendation")
        rows.append((_name_cell(candidate, names, is_reference=False),
                     *(_number(_score((by_suite.get(suite) or {}).get("score"), scale)) for suite in suites),
                     _number(_score(tasks.get("score"), scale), bold=True),
                     _degradation_cell(tasks),
                     Cell(str(recommendation or MISSING), str(tasks.get("reason") or ""),
                          tone=verdict_tone(recommendation), bold=True)))
    return Table(headers, tuple(rows))


def _degradation_cell(tasks: Mapping[str, Any]) -> Cell:
    degradation = _finite(tasks.get("degradation_pct"))
    threshold = _finite(tasks.get("threshold_pct"))
    if degradation is None:
        return _number(MISSING)
    words = ("no change" if abs(degradation) < 0.05 else
             f"{_fixed(degradation, 1)} % worse" if degradation > 0 else f"{_fixed(-degradation, 1)} % better")
    limit = f"The threshold is {_fixed(threshold, 1)} % worse." if threshold is not None else ""
    tone = WARN if threshold is not None and degradation > threshold else NEUTRAL
    return _number(words, limit, tone=tone)


def recommendations(report: Report) -> list[tuple[str, str, str]]:
    """(variant, recommendation, reason) for each candidate with a task verdict."""
    names = _short_names(report)
    return [(str(names.get(c.get("name"), c.get("name"))), str(c["tasks"].get("recommendation") or ""),
             str(c["tasks"].get("reason") or "")) for c in _candidates(report) if c.get("tasks")]


MEMORY_COLUMNS = (("weights_bytes", "Weights MB"), ("kv_bytes", "KV cache MB"), ("compute_bytes", "Compute MB"),
                  ("total_bytes", "Total MB"))


def memory_table(report: Report) -> Table:
    """Estimated memory to run each model: weights, KV cache, compute buffers and total, at the stated context."""
    reference = report.get("reference") or {}
    everyone = [entry for entry in [reference, *_candidates(report)] if entry.get("memory")]
    if not everyone:
        return Table((), ())
    names = _short_names(report)
    headers = ("Variant", "Context", *(title for _key, title in MEMORY_COLUMNS))
    rows = []
    for entry in everyone:
        memory = entry["memory"]
        rows.append((_name_cell(entry, names, is_reference=entry is reference),
                     _number(_fixed(memory.get("n_ctx"), 0)),
                     *(_number(_megabytes(memory.get(key)), bold=key == "total_bytes") for key, _ in MEMORY_COLUMNS)))
    return Table(headers, tuple(rows))


def notes(report: Report) -> list[str]:
    """Every candidate's notes (a different vocabulary, a task warning), prefixed with its short name."""
    names = _short_names(report)
    return [f"{names.get(c.get('name'), c.get('name'))}: {note}" for c in _candidates(report)
            for note in c.get("notes") or [] if note]


def text_summary(report: Report) -> str:
    """"1 chunk of 512 tokens (255 scored) from 5 built-in texts, 21 s"."""
    text = report.get("text") or {}
    chunks = text.get("chunks") or 0
    sources = [str(source) for source in text.get("sources") or []]
    builtin = all(source.startswith("qdesk-builtin:") for source in sources)
    origin = (f"{len(sources)} built-in texts" if builtin and sources else ", ".join(sources) or "the text")
    seconds = _finite(report.get("seconds"))
    took = f", {seconds:.0f} s" if seconds is not None else ""
    return (f"{chunks} chunk{'s' if chunks != 1 else ''} of {text.get('ctx')} tokens "
            f"({text.get('scored_tokens')} scored) from {origin}{took}")


def plotted_candidates(report: Report) -> Sequence[Mapping[str, Any]]:
    """The candidates the chart can place: those with a size and a mean KLD."""
    return [c for c in _candidates(report) if _finite(c.get("kld_mean")) is not None and _finite(c.get("bytes"))]
