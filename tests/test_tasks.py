"""Task evaluation: checkers, suite files and their errors, scoring and comparing, and a run on the starter model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from converters.core.errors import Cancelled, UserError
from converters.core.jobs import CancelToken, Progress
from qdesk.evaluation.task_checkers import (
    CHECKER_TYPES,
    CheckerSpecError,
    build_checker,
    extract_code,
    extract_json,
    normalize_answer,
)
from qdesk.evaluation.tasks import (
    BUILTIN_SUITES,
    DEFAULT_SYSTEM,
    ItemResult,
    TaskCompareError,
    TaskFileError,
    TaskItem,
    TaskRun,
    check_answer,
    compare_runs,
    load_suite,
    load_suite_file,
    load_suites,
    run_tasks,
)

PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                 "required": ["name", "age"]}


def passes(checker: dict[str, Any], answer: str) -> bool:
    return build_checker(checker)(answer).passed


def item_line(**fields: Any) -> str:
    document = {"id": "q", "prompt": "What is 2 + 2?", "checker": {"type": "exact", "value": "4"}}
    document.update(fields)
    return json.dumps({key: value for key, value in document.items() if value is not None})


def write_suite(tmp_path: Path, *lines: str, name: str = "tasks.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(TaskFileError) as caught:
        load_suite_file(path)
    return str(caught.value)


# --- checkers --------------------------------------------------------------------------------------------------

def test_normalize_answer() -> None:
    assert normalize_answer('  "Paris".  ') == "paris"
    assert normalize_answer("`42`") == "42"
    assert normalize_answer("'New  York.'\n") == "new york"
    assert normalize_answer("3.5") == "3.5"


def test_exact_checker() -> None:
    assert passes({"type": "exact", "value": "Paris"}, " paris. ")
    assert passes({"type": "exact", "value": "Paris"}, "`PARIS`")
    assert not passes({"type": "exact", "value": "Paris"}, "The capital is Paris.")
    alternatives = {"type": "exact", "values": ["7", "seven"]}
    assert passes(alternatives, "Seven.") and passes(alternatives, '"7"')
    assert not passes(alternatives, "8")
    outcome = build_checker({"type": "exact", "value": "4"})("5")
    assert not outcome.passed and outcome.detail == "expected '4'"


def test_regex_checker() -> None:
    assert passes({"type": "regex", "pattern": r"\bParis\b"}, "The capital is Paris.")
    assert not passes({"type": "regex", "pattern": r"\bParis\b"}, "The capital is paris.")
    assert passes({"type": "regex", "pattern": r"\bParis\b", "flags": "i"}, "the capital is PARIS")
    assert not passes({"type": "regex", "pattern": r"\bParis\b", "flags": "i"}, "Parisian food")
    assert passes({"type": "regex", "pattern": r"^b$", "flags": "m"}, "a\nb\nc")


def test_contains_checker() -> None:
    assert passes({"type": "contains", "value": "Carbon Dioxide"}, "Plants absorb carbon dioxide.")
    assert not passes({"type": "contains", "value": "oxygen"}, "Plants absorb carbon dioxide.")


def test_extract_json() -> None:
    fenced = 'Here you go:\n```json\n{"name": "Ann", "age": 30}\n```\nDone {"x": 1}'
    assert extract_json(fenced).value == {"name": "Ann", "age": 30}
    nested = 'Sure! {"a": {"b": [1, {"c": "}"}]}, "d": "{"} and more text }'
    assert extract_json(nested).value == {"a": {"b": [1, {"c": "}"}]}, "d": "{"}
    assert extract_json("[note] then {\"k\": [1, 2]}").value == {"k": [1, 2]}
    assert extract_json("  42 ").value == 42
    assert extract_json("null").value is None
    assert extract_json("no JSON here at all") is None
    assert extract_json("{'single': 'quotes'}") is None
    assert extract_json('{"x": NaN}') is None
    assert extract_json("```json\n[1, 2, 3]\n").value == [1, 2, 3]  # a fence cut short by max_tokens
    assert extract_json("```python\nx = 1\n```\nThe JSON: {\"x\": 1}").value == {"x": 1}


def test_json_schema_checker() -> None:
    checker = {"type": "json_schema", "schema": PERSON_SCHEMA}
    assert passes(checker, '```json\n{"name": "Ann", "age": 30}\n```')
    assert passes(checker, 'The object is {"name": "Ann", "age": 30, "tags": {"a": [1]}}.')
    assert not passes(checker, '{"name": "Ann"}')
    assert not passes(checker, '{"name": "Ann", "age": "thirty"}')
    assert not passes(checker, '{"name": "Ann", "age": 30')
    outcome = build_checker(checker)("I cannot do that.")
    assert not outcome.passed and outcome.detail == "no JSON value found"
    mismatch = build_checker(checker)('{"name": "Ann"}')
    assert "'age' is a required property" in mismatch.detail


def test_extract_code() -> None:
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nExplanation.") == "def f():\n    return 1\n"
    assert extract_code("x = 1\ny = 2") == "x = 1\ny = 2"
    assert extract_code("```\n    a = 1\n    b = 2\n```") == "a = 1\nb = 2\n"


def test_python_compiles_checker() -> None:
    checker = {"type": "python_compiles"}
    assert passes(checker, "```python\ndef add(a, b):\n    return a + b\n```")
    assert passes(checker, "def add(a, b):\n    return a + b")
    assert passes(checker, "```python\nclass A:\n    pass\n")  # fence never closed: the code runs to the end
    assert passes(checker, "```python\nraise SystemExit('compiled, never run')\n```")
    assert not passes(checker, "```python\ndef add(a, b)\n    return a + b\n```")
    assert not passes(checker, "Sure! Here is the code you asked for.")
    assert not passes(checker, "```python\ndef f():\nreturn 1\n```")
    assert not passes(checker, "x = '\0'\0")
    assert not passes(checker, "x = " + "(" * 5000 + ")" * 5000)
    assert not passes(checker, "```python\n```")
    failed = build_checker(checker)("def f(:\n    pass")
    assert failed.detail.startswith("does not compile: SyntaxError")


@pytest.mark.parametrize(("checker", "fragment"), [
    ({"type": "exact"}, "the exact checker needs `checker.value`"),
    ({"type": "exact", "values": []}, "`checker.values` must be a non-empty list"),
    ({"type": "regex"}, "the regex checker needs `checker.pattern`"),
    ({"type": "regex", "pattern": "a", "flags": "q"}, "`checker.flags` must be a string of the letters i, m, s, x"),
    ({"type": "regex", "pattern": "(unclosed"}, "`checker.pattern` is not a valid regular expression"),
    ({"type": "contains", "value": ""}, "the contains checker needs `checker.value`"),
    ({"type": "json_schema"}, "the json_schema checker needs `checker.schema`"),
    ({"type": "json_schema", "schema": {"type": "nonsense"}}, "`checker.schema` is not a valid JSON schema"),
    ({"type": "python_compiles", "strict": True}, "`checker.strict` is not a parameter of the python_compiles"),
    ({"type": "exact", "value": "4", "flags": "i"}, "`checker.flags` is not a parameter of the exact checker"),
    ({"type": "shell"}, "`checker.type` must be one of exact, regex, contains, json_schema, python_compiles"),
    ({"value": "4"}, "`checker.type` must be one of"),
    ("exact", "`checker` must be a JSON object"),
])
def test_invalid_checker_descriptions(checker: Any, fragment: str) -> None:
    with pytest.raises(CheckerSpecError) as caught:
        build_checker(checker)
    assert fragment in str(caught.value)


def test_checker_that_raises_is_recorded_not_lost() -> None:
    """A schema whose `$ref` points nowhere is valid as a schema; it fails only when an answer reaches the ref."""
    schema = {"type": "object", "properties": {"address": {"$ref": "#/$defs/missing"}}}
    item = TaskItem("addr", "Give an address.", build_checker({"type": "json_schema", "schema": schema}), line=7)
    reaching = check_answer("mine", item, '{"address": "1 Main St"}')
    assert not reaching.passed and reaching.error is not None and "/$defs/missing" in reaching.error
    assert (reaching.suite, reaching.id, reaching.line, reaching.answer) == ("mine", "addr", 7,
                                                                            '{"address": "1 Main St"}')
    assert check_answer("mine", item, '{"name": "x"}').passed
    assert check_answer("mine", item, '{"name": "x"}').error is None


# --- loading ---------------------------------------------------------------------------------------------------

def test_load_suite_file_with_blank_lines(tmp_path: Path) -> None:
    path = write_suite(tmp_path,
                       item_line(id="a"),
                       "",
                       "   ",
                       item_line(id="b", system="Be terse.", max_tokens=8,
                                 checker={"type": "regex", "pattern": r"\b4\b"}),
                       item_line(id="c", system=""))
    suite = load_suite_file(path)
    assert suite.name == "tasks" and suite.path == path
    assert [(item.id, item.line) for item in suite.items] == [("a", 1), ("b", 4), ("c", 5)]
    first, second, third = suite.items
    assert first.system_prompt == DEFAULT_SYSTEM and first.max_tokens == 128
    assert second.system_prompt == "Be terse." and second.max_tokens == 8 and second.checker.type == "regex"
    assert third.system_prompt is None


def test_load_suite_file_with_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + item_line(id="a").encode() + b"\r\n" + item_line(id="b").encode() + b"\r\n")
    assert [item.line for item in load_suite_file(path).items] == [1, 2]


@pytest.mark.parametrize(("bad_line", "expected"), [
    ('{"id": "x", "prompt": ', "tasks.jsonl line 3: this is not valid JSON"),
    ('["id", "prompt"]', "tasks.jsonl line 3: each line must be a JSON object"),
    (item_line(id="x", prompt=None), "tasks.jsonl line 3: `prompt` is missing or empty; add the text"),
    (item_line(id="x", prompt="  "), "tasks.jsonl line 3: `prompt` is missing or empty"),
    (item_line(id=None), "tasks.jsonl line 3: `id` is missing or empty"),
    (item_line(id=5), "tasks.jsonl line 3: `id` is missing or empty"),
    (item_line(id="x", checker=None), "tasks.jsonl line 3: `checker` is missing"),
    (item_line(id="x", checker={"type": "similar", "value": "4"}),
     "tasks.jsonl line 3: `checker.type` must be one of exact, regex, contains, json_schema, python_compiles "
     '(not "similar"); fix the line.'),
    (item_line(id="x", checker={"type": "regex", "pattern": "[a-"}),
     "tasks.jsonl line 3: `checker.pattern` is not a valid regular expression (unterminated character set at "
     "position 0); fix the pattern."),
    (item_line(id="x", checker={"type": "json_schema", "schema": {"type": "object", "required": "name"}}),
     "tasks.jsonl line 3: `checker.schema` is not a valid JSON schema at `required`"),
    (item_line(id="x", max_tokens=0), "tasks.jsonl line 3: `max_tokens` must be a whole number of at least 1"),
    (item_line(id="x", max_tokens=True), "tasks.jsonl line 3: `max_tokens` must be a whole number"),
    (item_line(id="x", system=3), "tasks.jsonl line 3: `system` must be a string"),
    (item_line(id="x", answer="4"), "tasks.jsonl line 3: `answer` is not an item field"),
    (item_line(id="first"), "tasks.jsonl line 3: the id 'first' is already used on line 1; give each item its own id"),
])
def test_malformed_line_reports_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    path = write_suite(tmp_path, item_line(id="first"), "", bad_line, item_line(id="last"))
    message = load_error(path)
    assert message.startswith(expected), message
    assert message.endswith(".") and "\n" not in message


def test_empty_files_are_refused(tmp_path: Path) -> None:
    assert load_error(write_suite(tmp_path, "", name="empty.jsonl")) == (
        "empty.jsonl holds no items; add one JSON object per line with `id`, `prompt` and `checker`.")
    (tmp_path / "zero.jsonl").write_bytes(b"")
    assert load_error(tmp_path / "zero.jsonl").startswith("zero.jsonl holds no items")


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    latin = tmp_path / "latin.jsonl"
    not_utf8 = item_line(id="b", prompt="cafe").replace("cafe", "caf\xe9").encode("latin-1")
    latin.write_bytes(item_line(id="a").encode() + b"\n" + not_utf8)
    assert load_error(latin) == "latin.jsonl line 2: the line is not UTF-8 text; save the file as UTF-8."
    assert "does not exist; check the path" in load_error(tmp_path / "missing.jsonl")
    assert "is a folder, not a task file" in load_error(tmp_path)


def test_task_file_error_is_a_user_error() -> None:
    assert issubclass(TaskFileError, UserError) and issubclass(TaskCompareError, UserError)


def test_unknown_suite_name_lists_the_builtin_ones(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError) as caught:
        load_suite("jsn")
    assert str(caught.value) == ("there is no task suite called 'jsn'; use one of json, arithmetic, facts, code or "
                                 "builtin (all of them), or the path of a .jsonl file.")
    with pytest.raises(TaskFileError, match="does not exist"):
        load_suites(str(tmp_path / "mine.jsonl"))
    with pytest.raises(ValueError, match="load it with load_suites"):
        load_suite("builtin")
    with pytest.raises(TaskFileError, match="no task suite was given"):
        load_suites(" , ")


def test_builtin_suites_load_and_every_checker_is_valid() -> None:
    suites = load_suites("builtin")
    assert [suite.name for suite in suites] == list(BUILTIN_SUITES)
    for suite in suites:
        assert 30 <= len(suite.items) <= 40, suite.name
        assert len({item.id for item in suite.items}) == len(suite.items)
        for item in suite.items:
            assert item.checker.type in CHECKER_TYPES
            assert build_checker(item.checker.to_json()) == item.checker
            assert item.prompt.strip() and 1 <= item.max_tokens <= 256
    expected_types = {"json": {"json_schema"}, "arithmetic": {"regex"}, "code": {"python_compiles"}}
    for suite in suites:
        if suite.name in expected_types:
            assert {item.checker.type for item in suite.items} == expected_types[suite.name]


def builtin_item(suite: str, item_id: str) -> TaskItem:
    return next(item for item in load_suite(suite).items if item.id == item_id)


@pytest.mark.parametrize(("suite", "item_id", "answer", "expected"), [
    ("arithmetic", "add-small", "12", True),
    ("arithmetic", "add-small", "7 + 5 = 12\n", True),
    ("arithmetic", "add-small", "The answer is 12.0.", True),
    ("arithmetic", "add-small", "12 + 5 = 17", False),
    ("arithmetic", "add-small", "112", False),
    ("arithmetic", "add-small", "12.5", False),
    ("arithmetic", "sub-negative", "3 - 10 = -7", True),
    ("arithmetic", "sub-negative", "3 - 10 = 7", False),
    ("facts", "capital-france", "The capital of France is Paris.", True),
    ("facts", "capital-france", "The capital of France is Lyon.", False),
    ("facts", "days-in-week", "A week has 7 days.", True),
    ("facts", "days-in-week", "A week has 7 days and a year 52 weeks.", False),
    ("json", "person-ann", '{"name": "Ann", "age": 30}', True),
    ("json", "person-ann", '```json\n{"name": "Ann", "age": "30"}\n```', False),
    ("code", "factorial", "```python\ndef factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n"
                          "        result *= i\n    return result\n```", True),
    ("code", "factorial", "def factorial(n):\n    for i in range(n)\n        pass", False),
])
def test_builtin_checkers_judge_answers(suite: str, item_id: str, answer: str, expected: bool) -> None:
    assert check_answer(suite, builtin_item(suite, item_id), answer).passed is expected


def test_load_suites_orders_and_deduplicates(tmp_path: Path) -> None:
    mine = write_suite(tmp_path, item_line(id="a"), name="json.jsonl")
    suites = load_suites(f"arithmetic, json,arithmetic,{mine}")
    assert [suite.name for suite in suites] == ["arithmetic", "json", str(mine)]
    assert [suite.name for suite in load_suites(mine)] == ["json"]
    assert [suite.name for suite in load_suites(["facts", "builtin"])] == ["facts", "json", "arithmetic", "code"]


# --- scores and verdicts ---------------------------------------------------------------------------------------

def make_run(passed_by_suite: dict[str, list[bool]], *, error_on: str | None = None) -> TaskRun:
    results = []
    for suite, outcomes in passed_by_suite.items():
        for index, passed in enumerate(outcomes):
            item_id = f"{suite}-{index}"
            error = "PointerToNowhere: '/$defs/x'" if item_id == error_on else None
            results.append(ItemResult(suite, item_id, index + 1, passed and error is None, f"answer {index}",
                                      error=error))
    return TaskRun(Path("model.gguf"), tuple(passed_by_suite), tuple(results), {name: 1.0 for name in passed_by_suite})


def test_task_run_scores_and_json() -> None:
    run = make_run({"json": [True, False, True, True], "arithmetic": [True, False]}, error_on="json-1")
    assert run.to_json() == {
        "suite": "json,arithmetic", "score": 4 / 6, "items": 6, "passed": 4,
        "by_suite": {"json": 0.75, "arithmetic": 0.5},
        "errors": [{"suite": "json", "id": "json-1", "line": 2, "error": "PointerToNowhere: '/$defs/x'"}],
    }
    assert run.warnings() == ["json: item json-1 (line 2) could not be checked: PointerToNowhere: '/$defs/x'; "
                              "it counts as failed."]
    items = run.to_json(include_items=True)["results"]
    assert [item["id"] for item in items] == ["json-0", "json-1", "json-2", "json-3", "arithmetic-0", "arithmetic-1"]
    assert set(items[0]) == {"suite", "id", "line", "passed", "answer", "error", "detail", "seconds"}
    assert run.seconds == 2.0
    json.dumps(run.to_json(include_items=True))


def test_compare_runs_deploy_and_investigate() -> None:
    reference = make_run({"json": [True] * 8 + [False] * 2, "code": [True] * 10})
    same = compare_runs(reference, make_run({"json": [True] * 8 + [False] * 2, "code": [True] * 10}))
    assert same.degradation_pct == 0.0 and same.recommendation == "deploy" and same.reason is None
    worse = compare_runs(reference, make_run({"json": [True] * 6 + [False] * 4, "code": [True] * 10}))
    assert worse.score == 0.8 and worse.reference_score == 0.9
    assert worse.degradation_pct == pytest.approx(100 / 9)
    assert worse.recommendation == "investigate" and "above the 5% threshold" in (worse.reason or "")
    assert worse.by_suite["json"].score == 0.6 and worse.by_suite["json"].reference_score == 0.8
    assert worse.by_suite["json"].degradation_pct == pytest.approx(25.0)
    assert compare_runs(reference, make_run({"json": [True] * 6 + [False] * 4, "code": [True] * 10}),
                        threshold_pct=12.0).recommendation == "deploy"
    better = compare_runs(make_run({"json": [True, False]}), make_run({"json": [True, True]}))
    assert better.degradation_pct == -100.0 and better.recommendation == "deploy"
    assert worse.to_json() == {
        "suite": "json,code", "score": 0.8, "reference_score": 0.9, "degradation_pct": pytest.approx(100 / 9),
        "recommendation": "investigate", "threshold_pct": 5.0,
        "by_suite": {"json": {"score": 0.6, "reference_score": 0.8, "degradation_pct": pytest.approx(25.0)},
                     "code": {"score": 1.0, "reference_score": 1.0, "degradation_pct": 0.0}},
        "reason": worse.reason,
    }


def test_compare_runs_at_the_threshold_deploys() -> None:
    reference = make_run({"facts": [True] * 20})
    candidate = make_run({"facts": [True] * 19 + [False]})
    verdict = compare_runs(reference, candidate)
    assert verdict.degradation_pct == 5.0 and verdict.recommendation == "deploy"


def test_compare_runs_when_the_reference_passes_nothing() -> None:
    verdict = compare_runs(make_run({"json": [False, False]}), make_run({"json": [True, False]}))
    assert verdict.degradation_pct is None and verdict.recommendation == "investigate"
    assert verdict.reason is not None and "reference passes none of the 2 items" in verdict.reason
    assert verdict.by_suite["json"].degradation_pct is None
    assert verdict.to_json()["degradation_pct"] is None


def test_compare_runs_refuses_different_items() -> None:
    with pytest.raises(TaskCompareError, match="run both models on the same suites"):
        compare_runs(make_run({"json": [True]}), make_run({"code": [True]}))
    with pytest.raises(TaskCompareError):
        compare_runs(make_run({"json": [True]}), make_run({"json": [True, True]}))
    with pytest.raises(ValueError):
        compare_runs(make_run({"json": [True]}), make_run({"json": [True]}), threshold_pct=-1)


def test_run_tasks_checks_suites_before_loading_a_model(tmp_path: Path) -> None:
    bad = write_suite(tmp_path, item_line(id="a", checker={"type": "regex", "pattern": "("}))
    with pytest.raises(TaskFileError, match=r"tasks\.jsonl line 1"):
        run_tasks(tmp_path / "not-even-there.gguf", str(bad))
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        run_tasks(tmp_path / "not-even-there.gguf", "json", cancel=cancel)


# --- the real starter model ------------------------------------------------------------------------------------

E2E_ITEMS = [
    {"id": "capital", "prompt": "What is the capital of France? Answer with one word.",
     "checker": {"type": "regex", "pattern": r"\bParis\b", "flags": "i"}, "max_tokens": 24},
    {"id": "sum", "prompt": "What is 7 + 5? Answer with the number only.", "max_tokens": 24,
     "system": "You are a calculator. Reply with the number only, no words.",
     "checker": {"type": "regex", "pattern": r"(?<![\d.])12\D*$"}},
    {"id": "code", "prompt": "Write a Python function named add that returns the sum of two numbers.",
     "checker": {"type": "python_compiles"}, "max_tokens": 24},
    {"id": "unresolvable", "prompt": 'Output a JSON object with one key "answer" whose value is the number 4.',
     "checker": {"type": "json_schema", "schema": {"$ref": "#/$defs/missing"}}, "max_tokens": 24},
]


@pytest.mark.slow
def test_run_tasks_on_the_starter_model(starter_gguf: Path, tmp_path: Path) -> None:
    suite = write_suite(tmp_path, *(json.dumps(item) for item in E2E_ITEMS), name="e2e.jsonl")
    reports: list[Progress] = []
    first = run_tasks(starter_gguf, str(suite), n_ctx=512, n_threads=2, progress=reports.append)
    second = run_tasks(starter_gguf, [suite], n_ctx=512, n_threads=2)

    assert first.suites == ("e2e",) and first.items == 4 and first.model == starter_gguf
    assert [(r.id, r.line) for r in first.results] == [("capital", 1), ("sum", 2), ("code", 3), ("unresolvable", 4)]
    assert all(r.answer for r in first.results)
    unresolvable = first.results[3]
    assert not unresolvable.passed and unresolvable.error is not None and "missing" in unresolvable.error
    assert [r.id for r in first.errors] == ["unresolvable"]
    assert first.warnings()[0].startswith("e2e: item unresolvable (line 4) could not be checked: ")
    document = first.to_json()
    assert set(document) == {"suite", "score", "items", "passed", "by_suite", "errors"}
    assert document["by_suite"] == {"e2e": first.score} and document["passed"] == first.passed
    assert [(r.done, r.total, r.unit) for r in reports] == [(0, 4, "items"), (1, 4, "items"), (2, 4, "items"),
                                                             (3, 4, "items"), (4, 4, "items")]
    print(f"\nstarter model on the e2e suite: {first.passed}/{first.items}, "
          f"{[(r.id, r.passed, r.answer) for r in first.results]}")

    assert [(r.answer, r.passed, r.error) for r in second.results] == [(r.answer, r.passed, r.error)
                                                                       for r in first.results]
    verdict = compare_runs(first, second)
    assert verdict.degradation_pct in (0.0, None)


@pytest.mark.slow
def test_run_tasks_cancels_between_items(starter_gguf: Path, tmp_path: Path) -> None:
    suite = write_suite(tmp_path, *(json.dumps(item) for item in E2E_ITEMS), name="e2e.jsonl")
    cancel = CancelToken()

    def cancel_after_first_item(report: Progress) -> None:
        if report.done >= 1:
            cancel.cancel()

    with pytest.raises(Cancelled):
        run_tasks(starter_gguf, str(suite), n_ctx=512, n_threads=2, progress=cancel_after_first_item, cancel=cancel)
