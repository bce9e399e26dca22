"""What the evaluation report shows, shared by the HTML page (`report.py`) and the desktop app's Evaluate section.

Both read the document `qdesk eval` produces (docs/report.md) through this module, so the page and the window agree
to the digit: the number formats (a missing or non-finite value reads "—", "∞" or "n/a"), the short variant names,
the task-score scale and verdict words, the chart's axes, points and label placement (in the chart's own
coordinate system, `CHART_WIDTH` × `CHART_HEIGHT`), and the heat map's colour scale. Nothing here knows HTML or Qt.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

Report = Mapping[str, Any]

MISSING = "—"
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


# --- numbers ----------------------------------------------------------------------------------------------------

def finite(value: Any) -> float | None:
    """The value as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _not_finite_text(value: Any) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return MISSING


def fixed(value: Any, digits: int) -> str:
    """"1,234.57" with `digits` decimals and a true minus sign."""
    number = finite(value)
    return _not_finite_text(value) if number is None else f"{number:,.{digits}f}".replace("-", "−")


def significant(value: Any, digits: int = 4) -> str:
    """`digits` significant digits ("0.0812", "1.9e−05"); exactly "0" for zero."""
    number = finite(value)
    if number is None:
        return _not_finite_text(value)
    return "0" if number == 0 else f"{number:.{digits}g}".replace("-", "−")


def integer(value: Any) -> str:
    number = finite(value)
    return MISSING if number is None else f"{number:,.0f}"


def megabytes(value: Any) -> str:
    """Bytes as a figure in MB for a column headed MB: two decimals below 10 MB, one above."""
    number = finite(value)
    if number is None:
        return MISSING
    value_mb = number / 1e6
    return f"{value_mb:,.2f}" if value_mb < 10 else f"{value_mb:,.1f}"


def rate(tokens_per_second: Any) -> str:
    """Tokens per second: no decimals from 100, one below."""
    number = finite(tokens_per_second)
    return fixed(number, 0 if number is not None and number >= 100 else 1)


def percent(fraction: Any) -> str:
    """A fraction as a percentage: 0.9012 → "90.12 %"."""
    number = finite(fraction)
    return _not_finite_text(fraction) if number is None else f"{number * 100:.2f} %"


def signed_percent(value: Any) -> str:
    """A change already in percent, with its sign: "+8.04 %", "−1.23 %"."""
    number = finite(value)
    return _not_finite_text(value) if number is None else f"{number:+.2f} %".replace("-", "−")


def scaled(value: Any, factor: float) -> float | None:
    number = finite(value)
    return None if number is None else number * factor


def relative_change(value: Any, reference: Any) -> float | None:
    """How much `value` differs from `reference`, in percent of the reference; None when either is unknown."""
    value, reference = finite(value), finite(reference)
    if value is None or not reference:
        return None
    return (value - reference) / reference * 100.0


def display_date(created: Any) -> str:
    """An ISO timestamp as "2026-11-23 12:00 UTC" (the zone only when it is UTC); anything else as given."""
    try:
        moment = datetime.fromisoformat(str(created))
    except ValueError:
        return str(created)
    zone = " UTC" if moment.utcoffset() is not None and not moment.utcoffset() else ""
    return moment.strftime("%Y-%m-%d %H:%M") + zone


_VISIBLE = {"\n": "↵", "\r": "␍", "\t": "→\t"}


def visible(piece: str, *, for_title: bool = False) -> str:
    """Whitespace and control characters made visible; spaces kept (a page shows them with pre-wrap), or shown as
    ␣ in a tooltip (`for_title`)."""
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


def css_token(value: str) -> str:
    """A value reduced to a safe class-name word ("investigate", "none")."""
    return "".join(ch for ch in value.lower() if ch.isalnum() or ch == "-") or "none"


# --- names ------------------------------------------------------------------------------------------------------

def candidates(report: Report) -> list[Mapping[str, Any]]:
    return [c for c in report.get("candidates") or [] if c]


def short_names(report: Report) -> dict[Any, str]:
    """Each name without `.gguf` and without the words it shares with the reference's ("SmolLM2-135M-…-Q4_K_M" →
    "Q4_K_M"); without a reference, without the words all names share. Full names where short ones would clash."""
    full = [entry.get("name") for entry in [report.get("reference") or {}, *candidates(report)] if entry.get("name")]
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


def why_no_kld(candidate: Mapping[str, Any]) -> str:
    if candidate.get("same_vocab") is False:
        return "different vocabulary, so no KLD against the reference"
    return "KLD not measured"


# --- tasks ------------------------------------------------------------------------------------------------------

def score_scale(report: Report) -> float:
    """100 when every task score in the report is a fraction (shown as a percentage), else 1 (shown as given)."""
    scores: list[float] = []
    reference_tasks = (report.get("reference") or {}).get("tasks") or {}
    scores.extend(v for v in [reference_tasks.get("score"), *(reference_tasks.get("by_suite") or {}).values()])
    for candidate in candidates(report):
        tasks = candidate.get("tasks") or {}
        scores.extend([tasks.get("score"), tasks.get("reference_score")])
        for entry in (tasks.get("by_suite") or {}).values():
            scores.extend([entry.get("score"), entry.get("reference_score")])
    known = [v for v in (finite(s) for s in scores) if v is not None]
    return 100.0 if known and all(0.0 <= v <= 1.0 for v in known) else 1.0


def score(value: Any, scale: float) -> str:
    """A task score: "55.0 %" on the percentage scale, else its significant digits."""
    number = finite(value)
    if number is None:
        return MISSING
    return f"{number * 100:.1f} %" if scale == 100.0 else significant(number)


def suite_names(reference_tasks: Mapping[str, Any], scored: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every suite scored by the reference or a candidate, in the order they first appear."""
    names: dict[str, None] = dict.fromkeys(reference_tasks.get("by_suite") or {})
    for candidate in scored:
        names.update(dict.fromkeys(candidate["tasks"].get("by_suite") or {}))
    return list(names)


def suite_reference_score(suite: str, reference_tasks: Mapping[str, Any],
                          scored: Sequence[Mapping[str, Any]]) -> float | None:
    """The reference's score on `suite`: from its own entry, else from a candidate's verdict."""
    by_suite = reference_tasks.get("by_suite") or {}
    if suite in by_suite:
        return by_suite[suite]
    for candidate in scored:
        entry = (candidate["tasks"].get("by_suite") or {}).get(suite)
        if entry and entry.get("reference_score") is not None:
            return entry["reference_score"]
    return None


def degradation(score_value: Any, reference_score: Any) -> float | None:
    """How much worse than the reference's a score is, in percent of the reference's (negative: better)."""
    value, reference = finite(score_value), finite(reference_score)
    if value is None or not reference:
        return None
    return (reference - value) / reference * 100.0


def change_words(degradation_pct: Any) -> str | None:
    """"12.9 % worse", "3.0 % better", "no change"; None when unknown."""
    value = finite(degradation_pct)
    if value is None:
        return None
    if abs(value) < 0.05:
        return "no change"
    return f"{fixed(value, 1)} % worse" if value > 0 else f"{fixed(-value, 1)} % better"


# --- the chart --------------------------------------------------------------------------------------------------

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


def size_axis(sizes_mb: Sequence[float]) -> Axis:
    """From 0 MB to a round number above the largest size."""
    high, ticks = _linear_ticks(max(sizes_mb) * 1.04 if sizes_mb else 1.0)
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


def tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:g}"


def is_decade(value: float) -> bool:
    exponent = math.log10(value)
    return abs(exponent - round(exponent)) < 1e-9


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


def plotted_candidates(report: Report) -> list[Mapping[str, Any]]:
    """The candidates the chart can place: those with a size and a mean KLD."""
    return [c for c in candidates(report) if finite(c.get("kld_mean")) is not None and finite(c.get("bytes"))]


@dataclass(frozen=True)
class ChartPoint:
    """One candidate on the chart: where it sits and where its label goes, in chart coordinates."""

    name: str
    label: str
    x: float
    y: float
    verdict: str
    """The task recommendation ("deploy", "investigate") or "none"."""
    hollow: bool
    """A KLD of 0 drawn on a log axis's floor."""
    tooltip: str
    label_x: float
    label_y: float
    label_anchor: str
    """Like SVG's text-anchor: start, middle or end."""


@dataclass(frozen=True)
class ChartLayout:
    """Everything the size-vs-KLD chart draws, in chart coordinates (`CHART_WIDTH` × `CHART_HEIGHT`)."""

    x_axis: Axis
    y_axis: Axis
    points: tuple[ChartPoint, ...]
    reference_x: float | None
    """Where the reference's size falls on the size axis, if it is known."""

    def x_pixel(self, size_mb: float) -> float:
        return PLOT_LEFT + self.x_axis.fraction(size_mb) * (PLOT_RIGHT - PLOT_LEFT)

    def y_pixel(self, kld: float) -> float:
        return PLOT_BOTTOM - self.y_axis.fraction(kld) * (PLOT_BOTTOM - PLOT_TOP)

    @property
    def y_unit(self) -> str:
        return "(nats, log scale)" if self.y_axis.log else "(nats)"

    @property
    def y_title(self) -> str:
        return f"mean KLD vs reference {self.y_unit}"

    @property
    def drift_title(self) -> str:
        """The KLD axis in plain words, as the desktop app names it (the exact term kept)."""
        return f"drift from the reference: mean KLD {self.y_unit}"


def chart_layout(report: Report) -> ChartLayout | None:
    """Axes, points and label positions for the report's candidates; None when no candidate has a KLD."""
    plotted = plotted_candidates(report)
    if not plotted:
        return None
    names = short_names(report)
    reference_bytes = finite((report.get("reference") or {}).get("bytes"))
    sizes = [c["bytes"] / 1e6 for c in plotted]
    klds = [max(0.0, float(c["kld_mean"])) for c in plotted]  # rounding can leave a self-comparison at -1e-9
    x_axis = size_axis([*sizes, *([reference_bytes / 1e6] if reference_bytes else [])])
    y_axis = kld_axis(klds)
    frame = ChartLayout(x_axis, y_axis, (), None)
    positions = [(frame.x_pixel(size), frame.y_pixel(kld)) for size, kld in zip(sizes, klds, strict=True)]
    hollow = [kld == 0 and y_axis.log for kld in klds]
    labels = [str(names.get(c.get("name"), c.get("name"))) + (" (KLD 0)" if empty else "")
              for c, empty in zip(plotted, hollow, strict=True)]
    placements = place_labels(positions, labels)
    points = tuple(
        ChartPoint(name=str(candidate.get("name")), label=label, x=x, y=y,
                   verdict=str((candidate.get("tasks") or {}).get("recommendation") or "none"), hollow=empty,
                   tooltip=f"{candidate.get('name')}: {megabytes(size * 1e6)} MB, mean KLD {significant(kld)} nats",
                   label_x=label_x, label_y=label_y, label_anchor=anchor)
        for candidate, (x, y), size, kld, label, empty, (label_x, label_y, anchor)
        in zip(plotted, positions, sizes, klds, labels, hollow, placements, strict=True))
    reference_x = frame.x_pixel(reference_bytes / 1e6) if reference_bytes else None
    return ChartLayout(x_axis, y_axis, points, reference_x)


# --- the heat map -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeatScale:
    """KLD values from 0 to `cap` spread over HEAT_BINS colour steps; `basis` says where the cap comes from."""

    cap: float
    basis: str

    def step(self, value: float) -> int:
        return min(HEAT_BINS - 1, int(value / self.cap * HEAT_BINS)) if value > 0 else 0

    def legend(self) -> list[str]:
        """Each colour step's range of values: "0–0.0125", …, "≥ 0.0875"."""
        width = self.cap / HEAT_BINS
        texts = []
        for step in range(HEAT_BINS):
            low, high = significant(step * width, 3), significant((step + 1) * width, 3)
            texts.append(f"≥ {low}" if step == HEAT_BINS - 1 else f"{low}–{high}")
        return texts


def heat_scale(values: Sequence[float]) -> HeatScale:
    """Full colour at the 99th percentile of all the sample's values, but never below HEAT_CAP_FLOOR nats."""
    value = _percentile(values, HEAT_PERCENTILE) if values else 0.0
    if value >= HEAT_CAP_FLOOR:
        return HeatScale(value, "the 99th percentile of the sample's per-token KLD, over all variants")
    return HeatScale(HEAT_CAP_FLOOR, f"a fixed floor of {HEAT_CAP_FLOOR:g} nats (the sample's 99th percentile, "
                                     f"{significant(value)}, is below it)")


def _percentile(values: Sequence[float], percent_rank: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * percent_rank / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


@dataclass(frozen=True)
class HeatRun:
    """One candidate's per-token KLD over the sample (None where a token was not measured)."""

    label: str
    name: str
    klds: tuple[float | None, ...]

    def kld_at(self, index: int) -> float | None:
        return self.klds[index] if index < len(self.klds) else None

    def stats(self, token_count: int) -> str:
        """"mean 0.0812, max 1.9 nats over 19 tokens", or "no values"."""
        measured = [v for v in self.klds[:token_count] if v is not None]
        if not measured:
            return "no values"
        return (f"mean {significant(sum(measured) / len(measured))}, max {significant(max(measured))} nats over "
                f"{len(measured)} tokens")


@dataclass(frozen=True)
class HeatMap:
    """The sample's tokens, each candidate's run over them and the colour scale they share."""

    tokens: tuple[str, ...]
    runs: tuple[HeatRun, ...]
    scale: HeatScale


def heat_map(report: Report) -> HeatMap | None:
    """The sample's tokens, each candidate's per-token KLD and the shared colour scale; None without a sample."""
    sample = report.get("sample") or {}
    tokens = tuple("" if token is None else str(token) for token in sample.get("tokens") or [])
    runs = [run for run in sample.get("candidates") or [] if run.get("kld") is not None]
    if not tokens or not runs:
        return None
    names = short_names(report)
    pooled = [v for run in runs for v in (finite(x) for x in run["kld"]) if v is not None]
    return HeatMap(tokens, tuple(HeatRun(str(names.get(run.get("name"), run.get("name"))), str(run.get("name") or ""),
                                         tuple(finite(x) for x in run["kld"])) for run in runs),
                   heat_scale(pooled))


def token_title(index: int, token: str, kld: float | None) -> str:
    """A token's hover text: "#5 < · KLD 1.9 nats"."""
    value = "not measured" if kld is None else f"{significant(kld)} nats"
    return f"#{index} {visible(token, for_title=True)} · KLD {value}"
