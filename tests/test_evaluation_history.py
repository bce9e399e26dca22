"""Finished evaluations kept across restarts, found again by the models they measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from qdesk.evaluation.history import KEPT, EvaluationHistory, HistoryError


def report(reference: str, *candidates: str) -> dict[str, object]:
    return {"reference": {"path": reference, "name": Path(reference).name},
            "candidates": [{"path": path, "name": Path(path).name} for path in candidates]}


def test_the_newest_evaluation_of_a_model_comes_back(tmp_path: Path) -> None:
    history = EvaluationHistory(tmp_path / "evaluations")
    assert history.latest() is None
    first = history.save(report("/m/F16.gguf", "/m/Q4.gguf", "/m/Q8.gguf"), "2 variants")
    second = history.save(report("/m/F16.gguf", "/m/Q4.gguf"))
    again = EvaluationHistory(tmp_path / "evaluations")
    assert again.latest() == second and again.latest("/m/Q8.gguf") == first
    assert again.latest(Path("/m/F16.gguf")) == second and again.latest("/m/other.gguf") is None
    assert again.load(first) == report("/m/F16.gguf", "/m/Q4.gguf", "/m/Q8.gguf")
    assert first.models == ("/m/F16.gguf", "/m/Q4.gguf", "/m/Q8.gguf") and first.summary == "2 variants"


def test_only_the_newest_are_kept_and_a_damaged_one_says_so(tmp_path: Path) -> None:
    history = EvaluationHistory(tmp_path)
    saved = [history.save(report("/r.gguf", f"/c{number}.gguf")) for number in range(KEPT + 2)]
    assert len(history.saved()) == KEPT and not (tmp_path / f"{saved[0].id}.json").exists()
    (tmp_path / f"{saved[-1].id}.json").write_text("{broken")
    with pytest.raises(HistoryError, match="cannot be read"):
        history.load(saved[-1])
