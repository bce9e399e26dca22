"""The Evaluate view's tables as rows of cells, shaped from the evaluation document (`Evaluation.to_json()`).

The same document feeds the HTML report (`qdesk.evaluation.report`); both format it through
`qdesk.evaluation.report_model`, so the window and the saved page agree to the digit. Nothing here imports Qt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qdesk.evaluation.report_model import (
    MISSING,
    Report,
    candidates,
    change_words,
    finite,
    fixed,
    megabytes,
    percent,
    rate,
    relative_change,
    score,
    score_scale,
    short_names,
    signed_percent,
    significant,
    suite_names,
    suite_reference_score,
    why_no_kld,
)

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
    others = candidates(report)
    if not reference and not others:
        return Table((), ())
    everyone = [reference, *others]
    show_tasks = any(entry.get("tasks") for entry in everyone)
    show_speed = any(entry.get("speed") for entry in everyone)
    names, scale = short_names(report), score_scale(report)
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
        cells = [_name_cell(entry, names, is_reference=is_reference), _number(megabytes(entry.get("bytes"))),
                 _number(fixed(entry.get("bpw"), 2)), _number(fixed(entry.get("ppl"), 3))]
        if is_reference:
            cells += [_number(MISSING)] * 4
        else:
            cells.append(_number(signed_percent(relative_change(entry.get("ppl"), reference.get("ppl")))))
            if finite(entry.get("kld_mean")) is None:
                why = why_no_kld(entry)
                cells += [Cell(MISSING, why, numeric=True, tone=MUTED)] * 2
            else:
                cells += [_number(significant(entry.get("kld_mean"))), _number(significant(entry.get("kld_p99")))]
            cells.append(_number(percent(entry.get("top1_agreement"))))
        if show_tasks:
            tasks = entry.get("tasks") or {}
            cells.append(_number(score(tasks.get("score"), scale)))
            recommendation = tasks.get("recommendation")
            cells.append(Cell(str(recommendation or ""), str(tasks.get("reason") or ""),
                              tone=verdict_tone(recommendation), bold=True))
        if show_speed:
            speed = entry.get("speed") or {}
            cells += [_number(rate(speed.get("prompt_tps"))), _number(rate(speed.get("generation_tps")))]
        rows.append(tuple(cells))
    return Table(tuple(headers), tuple(rows), tuple(tips))


def tasks_table(report: Report) -> Table:
    """One row per model: its score on each suite, overall, the change against the reference and the verdict."""
    reference = report.get("reference") or {}
    reference_tasks = reference.get("tasks") or {}
    scored = [candidate for candidate in candidates(report) if candidate.get("tasks")]
    if not reference_tasks and not scored:
        return Table((), ())
    names, scale = short_names(report), score_scale(report)
    suites = suite_names(reference_tasks, scored)
    headers = ("Variant", *suites, "All", "Change", "Recommendation")
    rows = []
    if reference:
        overall = reference_tasks.get("score")
        if overall is None and scored:
            overall = scored[0]["tasks"].get("reference_score")
        rows.append((_name_cell(reference, names, is_reference=True),
                     *(_number(score(suite_reference_score(suite, reference_tasks, scored), scale))
                       for suite in suites),
                     _number(score(overall, scale), bold=True), _number(MISSING), Cell("")))
    for candidate in scored:
        tasks = candidate["tasks"]
        by_suite = tasks.get("by_suite") or {}
        recommendation = tasks.get("recommendation")
        rows.append((_name_cell(candidate, names, is_reference=False),
                     *(_number(score((by_suite.get(suite) or {}).get("score"), scale)) for suite in suites),
                     _number(score(tasks.get("score"), scale), bold=True),
                     _degradation_cell(tasks),
                     Cell(str(recommendation or MISSING), str(tasks.get("reason") or ""),
                          tone=verdict_tone(recommendation), bold=True)))
    return Table(headers, tuple(rows))


def _degradation_cell(tasks: Mapping[str, Any]) -> Cell:
    degradation = finite(tasks.get("degradation_pct"))
    threshold = finite(tasks.get("threshold_pct"))
    if degradation is None:
        return _number(MISSING)
    words = change_words(degradation) or MISSING
    limit = f"The threshold is {fixed(threshold, 1)} % worse." if threshold is not None else ""
    tone = WARN if threshold is not None and degradation > threshold else NEUTRAL
    return _number(words, limit, tone=tone)


def recommendations(report: Report) -> list[tuple[str, str, str]]:
    """(variant, recommendation, reason) for each candidate with a task verdict."""
    names = short_names(report)
    return [(str(names.get(c.get("name"), c.get("name"))), str(c["tasks"].get("recommendation") or ""),
             str(c["tasks"].get("reason") or "")) for c in candidates(report) if c.get("tasks")]


MEMORY_COLUMNS = (("weights_bytes", "Weights MB"), ("kv_bytes", "KV cache MB"), ("compute_bytes", "Compute MB"),
                  ("total_bytes", "Total MB"))


def memory_table(report: Report) -> Table:
    """Estimated memory to run each model: weights, KV cache, compute buffers and total, at the stated context."""
    reference = report.get("reference") or {}
    everyone = [entry for entry in [reference, *candidates(report)] if entry.get("memory")]
    if not everyone:
        return Table((), ())
    names = short_names(report)
    headers = ("Variant", "Context", *(title for _key, title in MEMORY_COLUMNS))
    rows = []
    for entry in everyone:
        memory = entry["memory"]
        rows.append((_name_cell(entry, names, is_reference=entry is reference),
                     _number(fixed(memory.get("n_ctx"), 0)),
                     *(_number(megabytes(memory.get(key)), bold=key == "total_bytes") for key, _ in MEMORY_COLUMNS)))
    return Table(headers, tuple(rows))


def notes(report: Report) -> list[str]:
    """Every candidate's notes (a different vocabulary, a task warning), prefixed with its short name."""
    names = short_names(report)
    return [f"{names.get(c.get('name'), c.get('name'))}: {note}" for c in candidates(report)
            for note in c.get("notes") or [] if note]


def text_summary(report: Report) -> str:
    """"1 chunk of 512 tokens (255 scored) from 5 built-in texts, 21 s"."""
    text = report.get("text") or {}
    chunks = text.get("chunks") or 0
    sources = [str(source) for source in text.get("sources") or []]
    builtin = all(source.startswith("qdesk-builtin:") for source in sources)
    origin = (f"{len(sources)} built-in texts" if builtin and sources else ", ".join(sources) or "the text")
    seconds = finite(report.get("seconds"))
    took = f", {seconds:.0f} s" if seconds is not None else ""
    return (f"{chunks} chunk{'s' if chunks != 1 else ''} of {text.get('ctx')} tokens "
            f"({text.get('scored_tokens')} scored) from {origin}{took}")
