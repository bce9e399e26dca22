"""The self-contained HTML evaluation report and the JSON written beside it."""

from __future__ import annotations

import copy
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import qdesk
from converters.core.errors import OutputError
from qdesk.evaluation.report import render_html, write_report
from qdesk.evaluation.report_model import heat_scale, kld_axis

HOSTILE_NAME = "SmolLM2-135M-Instruct-Q4_K_M <script>alert('x')</script> & co.gguf"
VOID_ELEMENTS = {"meta", "br", "hr", "img", "input", "link", "wbr"}
SAMPLE_TOKENS = ["The", " quick", " brown", " fox", "\n", "<", "b", ">", " jumps", "\t", " over", "\x07", "", " & ",
                 "\n\n", " the", " lazy", " dog", "."]


def memory(weights: int, n_ctx: int = 2048) -> dict[str, Any]:
    kv = 50_331_648 * n_ctx // 2048
    compute = 21_000_000
    return {"n_ctx": n_ctx, "n_gpu_layers": 0, "kv_type": "f16", "weights_bytes": weights, "kv_bytes": kv,
            "compute_bytes": compute, "ram_bytes": weights + kv + compute, "vram_bytes": 0,
            "total_bytes": weights + kv + compute, "cpu": {}, "gpu": {}}


def candidate_tasks(score: float, recommendation: str, degradation: float | None) -> dict[str, Any]:
    return {"suite": "qdesk-mini", "score": score, "reference_score": 0.62, "degradation_pct": degradation,
            "recommendation": recommendation, "threshold_pct": 2.0,
            "by_suite": {"arithmetic": {"score": score - 0.05, "reference_score": 0.55},
                         "facts": {"score": score + 0.05, "reference_score": 0.69}},
            "reason": None if recommendation == "deploy" else "Score fell 12.9 % (more than 2 %)."}


def full_report() -> dict[str, Any]:
    """Three candidates: a Q4_K_M with a hostile name, the reference compared with itself, another vocabulary."""
    kld_q4 = [0.002, 0.01, 0.35, 0.04, 0.0, 1.9, 0.12, 0.03, 0.08, 0.0, 0.015, 0.6, 0.0, 0.2, 0.0, 0.01, 0.05, 0.4, 0.0]
    return {
        "qdesk_eval": 1,
        "created": "2026-11-23T12:00:00Z",
        "reference": {"path": "/models/SmolLM2-135M-Instruct-F16.gguf", "name": "SmolLM2-135M-Instruct-F16.gguf",
                      "bytes": 270_885_632, "bpw": 16.0, "ppl": 18.4213,
                      "tasks": {"suite": "qdesk-mini", "score": 0.62, "items": 50, "passed": 31,
                                "by_suite": {"arithmetic": 0.55, "facts": 0.69}},
                      "speed": {"prompt_tps": 2150.3, "generation_tps": 95.2},
                      "memory": memory(270_885_632)},
        "text": {"tokens": 24_576, "chunks": 48, "ctx": 512, "sources": ["wiki <test>.txt", "calibration.txt"]},
        "candidates": [
            {"path": f"/models/{HOSTILE_NAME}", "name": HOSTILE_NAME, "bytes": 105_466_880, "bpw": 6.23,
             "ppl": 19.902, "kld_mean": 0.0812, "kld_median": 0.0311, "kld_p99": 0.912, "kld_max": 4.87,
             "top1_agreement": 0.9012, "delta_p_mean": -0.0123, "same_vocab": True,
             "notes": ["Importance matrix from 48 chunks of <calibration> text."],
             "tasks": candidate_tasks(0.54, "investigate", 12.9), "speed": {"prompt_tps": 3020.0,
                                                                          "generation_tps": 160.4},
             "memory": memory(105_466_880)},
            {"path": "/models/SmolLM2-135M-Instruct-F16-self.gguf", "name": "SmolLM2-135M-Instruct-F16-self.gguf",
             "bytes": 270_885_632, "bpw": 16.0, "ppl": 18.4213, "kld_mean": 0.0, "kld_median": 0.0, "kld_p99": 0.0,
             "kld_max": 0.0, "top1_agreement": 1.0, "delta_p_mean": 0.0, "same_vocab": True, "notes": [],
             "tasks": candidate_tasks(0.62, "deploy", 0.0), "speed": None, "memory": memory(270_885_632)},
            {"path": "/models/Other-135M-Q4_K_M.gguf", "name": "Other-135M-Q4_K_M.gguf", "bytes": 98_000_000,
             "bpw": 5.8, "ppl": 22.5, "kld_mean": None, "kld_median": None, "kld_p99": None, "kld_max": None,
             "top1_agreement": None, "delta_p_mean": None, "same_vocab": False,
             "notes": ["Its vocabulary differs from the reference's, so only perplexity is compared."],
             "tasks": None, "speed": None, "memory": None},
        ],
        "sample": {"tokens": SAMPLE_TOKENS,
                   "candidates": [{"name": HOSTILE_NAME, "kld": kld_q4},
                                  {"name": "SmolLM2-135M-Instruct-F16-self.gguf", "kld": [0.0] * len(SAMPLE_TOKENS)}]},
    }


def bare_report() -> dict[str, Any]:
    """No tasks, no speed, no memory, no sample, no notes."""
    report = full_report()
    report["sample"] = None
    for entry in [report["reference"], *report["candidates"]]:
        entry.update(tasks=None, speed=None, memory=None)
        entry.pop("notes", None)
    return report


class Structure(HTMLParser):
    """Collects elements with their attributes and checks every end tag closes the innermost open element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.errors: list[str] = []
        self.texts_by_span: list[tuple[dict[str, str], str]] = []
        self._span: dict[str, str] | None = None
        self._span_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        self.elements.append((tag, attributes))
        if tag == "span" and "t" in attributes.get("class", "").split():
            self._span, self._span_text = attributes, []
        if tag not in VOID_ELEMENTS:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._span is not None:
            self.texts_by_span.append((self._span, "".join(self._span_text)))
            self._span = None
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1] if self.open else 'nothing'}")
        else:
            self.open.pop()

    def handle_data(self, data: str) -> None:
        if self._span is not None:
            self._span_text.append(data)


def parse(page: str) -> Structure:
    structure = Structure()
    structure.feed(page)
    structure.close()
    assert structure.errors == []
    assert structure.open == []
    return structure


def with_class(structure: Structure, tag: str, css: str) -> list[dict[str, str]]:
    return [attrs for name, attrs in structure.elements if name == tag and css in attrs.get("class", "").split()]


def test_the_page_parses_with_balanced_tags_and_loads_nothing_from_elsewhere() -> None:
    page = render_html(full_report())
    structure = parse(page)
    assert page.startswith("<!DOCTYPE html>")
    for _, attrs in structure.elements:
        for attribute in ("src", "href", "xlink:href", "action", "data"):
            assert not re.match(r"\s*(https?:)?//", attrs.get(attribute, "")), attrs
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page
    assert not [name for name, _ in structure.elements if name in ("link", "img", "iframe", "object", "embed")]
    assert [attrs for name, attrs in structure.elements if name == "script"] == [{}]  # only the print helper
    assert f"qdesk</dt><dd>{qdesk.__version__}" in page
    assert "2026-11-23 12:00 UTC" in page


def test_every_string_from_the_data_is_escaped() -> None:
    page = render_html(full_report())
    assert "<script>alert" not in page
    assert page.count("<script>") == 1
    assert "SmolLM2-135M-Instruct-Q4_K_M &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co.gguf" in page
    assert "& co" not in page
    assert "wiki &lt;test&gt;.txt" in page
    assert "&lt;calibration&gt;" in page
    for name in ("SmolLM2-135M-Instruct-F16-self.gguf", "Other-135M-Q4_K_M.gguf", "SmolLM2-135M-Instruct-F16.gguf"):
        assert name in page


def test_the_summary_has_a_row_per_variant_with_verdicts_and_speed() -> None:
    page = render_html(full_report())
    summary = page[page.index('id="summary"'):page.index('id="chart"')]
    assert summary.count("<tr") == 2 + 1 + 3  # two header rows, the reference, three candidates
    assert '<span class="badge investigate">investigate</span>' in summary
    assert '<span class="badge deploy">deploy</span>' in summary
    assert "+8.04 %" in summary  # ΔPPL of the Q4_K_M: 19.902 / 18.4213 - 1
    assert "90.12 %" in summary and "−1.23 %" in summary
    assert "different vocabulary" in summary
    assert "3,020" in summary and "160.4" not in summary and "160" in summary and "Speed (tokens/s)" in summary


def test_the_chart_has_one_labelled_point_per_candidate_with_a_kld() -> None:
    page = render_html(full_report())
    structure = parse(page)
    points = with_class(structure, "circle", "point")
    assert len(points) == 2  # the third candidate has another vocabulary
    chart = page[page.index('id="chart"'):page.index('id="tasks"')]
    assert "file size (MB)" in chart and "mean KLD vs reference (nats)" in chart
    assert ">Q4_K_M &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co</text>" in chart
    assert ">F16-self</text>" in chart
    assert "Not on the chart" in chart and "Other-135M-Q4_K_M" in chart
    assert len(with_class(structure, "text", "tick")) >= 6


def test_the_chart_handles_one_point_and_a_wide_span_on_a_log_scale() -> None:
    one = full_report()
    one["candidates"] = one["candidates"][:1]
    structure = parse(render_html(one))
    assert len(with_class(structure, "circle", "point")) == 1

    wide = full_report()
    wide["candidates"][1]["kld_mean"] = 0.0
    wide["candidates"].append({**wide["candidates"][0], "name": "Q8_0.gguf", "kld_mean": 0.0009, "bytes": 145e6})
    page = render_html(wide)
    structure = parse(page)
    assert len(with_class(structure, "circle", "point")) == 3
    assert len(with_class(structure, "circle", "clamped")) == 1  # zero KLD sits on the log axis floor
    assert "log scale" in page

    axis = kld_axis([0.0, 0.001, 0.3])
    assert axis.log and axis.low < 0.001 and axis.high >= 0.3
    assert not kld_axis([0.05, 0.2]).log
    assert not kld_axis([0.0]).log


def test_the_heat_map_has_one_span_per_token_with_its_kld_in_the_title() -> None:
    report = full_report()
    page = render_html(report)
    structure = parse(page)
    spans = structure.texts_by_span
    runs = report["sample"]["candidates"]
    assert len(spans) == len(SAMPLE_TOKENS) * len(runs)
    for run_index, run in enumerate(runs):
        for token_index, kld in enumerate(run["kld"]):
            attrs, _ = spans[run_index * len(SAMPLE_TOKENS) + token_index]
            value = re.search(r"KLD ([0-9.e\-−]+) nats", attrs["title"])
            assert value, attrs["title"]
            assert math.isclose(float(value.group(1).replace("−", "-")), kld, rel_tol=1e-3, abs_tol=1e-9)
            assert attrs["title"].startswith(f"#{token_index} ")
    shown = [text for _, text in spans[: len(SAMPLE_TOKENS)]]
    assert shown[4] == "↵" and shown[14] == "↵↵"
    assert shown[5] == "<" and shown[9] == "→\t" and shown[11] == "␇" and shown[12] == "∅"
    assert shown[1] == " quick"  # spaces kept as they are
    sample = page[page.index('id="sample"'):]
    assert sample.count("<br>") == 3 * len(runs)
    assert sample.count("<details") == 2 and sample.count("<details class=\"heatmap\" open>") == 1
    assert "99th percentile" in sample  # the legend says where full colour comes from


def test_the_heat_scale_caps_at_the_99th_percentile_or_a_floor() -> None:
    values = [0.01] * 200 + [0.5] * 3 + [40.0]
    scale = heat_scale(values)
    assert 0.4 < scale.cap < 1.0 and "99th percentile" in scale.basis
    assert scale.step(40.0) == scale.step(scale.cap) == 7
    assert scale.step(0.0) == 0
    quiet = heat_scale([0.0, 0.001, 0.002])
    assert quiet.cap == 0.05 and "fixed floor" in quiet.basis


def test_the_task_and_memory_tables() -> None:
    page = render_html(full_report())
    tasks = page[page.index('id="tasks"'):page.index('id="memory"')]
    for row in ("arithmetic", "facts", ">all<", ">verdict<"):
        assert row in tasks
    assert "12.9 % worse" in tasks and "no change" in tasks
    assert "Score fell 12.9 %" in tasks
    assert "55.0 %" in tasks  # fractions shown as percentages
    memory_table = page[page.index('id="memory"'):page.index('id="sample"')]
    assert "context of 2,048 tokens" in memory_table
    assert memory_table.count("<tr") == 1 + 3  # header, the reference, two candidates with an estimate
    assert "342.2" in memory_table  # 270.9 + 50.3 + 21.0 MB


def test_missing_parts_are_left_out_with_their_headings() -> None:
    page = render_html(bare_report())
    parse(page)
    for section in ('id="tasks"', 'id="memory"', 'id="sample"', 'id="notes"', ">Tasks<", ">Memory<", ">Notes<",
                    "Speed", "verdict", "<details"):
        assert section not in page
    assert 'id="summary"' in page and 'id="chart"' in page

    empty = render_html({"qdesk_eval": 1, "reference": {"name": "ref.gguf", "bytes": 1, "bpw": 16.0, "ppl": 3.0},
                         "candidates": []})
    parse(empty)
    assert 'id="chart"' not in empty


def test_non_finite_numbers_are_shown_and_written_as_null(tmp_path: Path) -> None:
    report = full_report()
    report["candidates"][0]["ppl"] = float("inf")
    report["candidates"][0]["kld_max"] = float("nan")
    page = render_html(report)
    parse(page)
    assert "∞" in page
    _, json_path = write_report(report, tmp_path / "eval.html")
    written = json.loads(json_path.read_text(encoding="utf-8"))
    assert written["candidates"][0]["ppl"] is None and written["candidates"][0]["kld_max"] is None


def test_write_report_writes_both_files_and_the_json_round_trips(tmp_path: Path) -> None:
    report = full_report()
    html_path, json_path = write_report(report, tmp_path / "eval.html")
    assert html_path == tmp_path / "eval.html" and json_path == tmp_path / "eval.json"
    assert html_path.read_text(encoding="utf-8") == render_html(report)
    assert json.loads(json_path.read_text(encoding="utf-8")) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.html", "eval.json"]


def test_a_failed_write_leaves_nothing_behind_and_earlier_files_unchanged(tmp_path: Path) -> None:
    broken = full_report()
    broken["candidates"][0]["notes"] = [object()]  # renders, but JSON cannot hold it
    with pytest.raises(TypeError):
        write_report(broken, tmp_path / "fresh.html")
    assert list(tmp_path.iterdir()) == []

    html_path, json_path = write_report(full_report(), tmp_path / "eval.html")
    before = (html_path.read_bytes(), json_path.read_bytes())
    with pytest.raises(TypeError):
        write_report(broken, html_path)
    assert (html_path.read_bytes(), json_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.html", "eval.json"]


def test_a_failure_while_writing_removes_both_temporary_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    html_path, json_path = write_report(full_report(), tmp_path / "eval.html")
    before = (html_path.read_bytes(), json_path.read_bytes())
    changed = copy.deepcopy(full_report())
    changed["created"] = "2027-01-01T00:00:00Z"
    original = Path.write_text

    def full_disk(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if self.name.startswith(".eval.json."):
            raise OSError(28, "No space left on device")
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OutputError, match="disk is full"):
        write_report(changed, html_path)
    assert (html_path.read_bytes(), json_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.html", "eval.json"]


def test_a_json_file_name_for_the_page_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"\.html"):
        write_report(full_report(), tmp_path / "eval.json")
    assert list(tmp_path.iterdir()) == []
