"""Task evaluation: small question suites whose answers are checked, to see what quantization does to a model's
ability to produce JSON that parses, code that compiles, arithmetic and facts — damage that perplexity hides.

A suite is a JSONL file, one item per line (blank lines allowed):

    {"id": "capital-france", "prompt": "What is the capital of France? Answer with one word.",
     "checker": {"type": "regex", "pattern": "\\\\bParis\\\\b", "flags": "i"},
     "system": "optional system prompt", "max_tokens": 32}

`checker.type` is one of exact, regex, contains, json_schema, python_compiles (see `qdesk.evaluation.task_checkers`).
Built-in
suites (`json`, `arithmetic`, `facts`, `code`; `builtin` is all four) live in `resources/eval/tasks/`; any other
suite is the path of a .jsonl file. Files are validated entirely when loaded (`TaskFileError` names the file and
line). `run_tasks` answers every item greedily with one model; `compare_runs` turns a reference's and a candidate's
runs into a score, a degradation percentage and a deploy/investigate recommendation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.core.errors import Cancelled, UserError
from converters.core.jobs import CancelToken, Progress, ProgressFn
from converters.core.paths import resources_dir
from qdesk.chat.engine import EngineError, LoadedModel, LoadOptions, ModelCrashed, SamplingOptions, load_model
from qdesk.chat.lora import LoraChoice
from qdesk.evaluation.task_checkers import CHECKER_TYPES, Checker, CheckerSpecError, build_checker

BUILTIN_SUITES = ("json", "arithmetic", "facts", "code")
ALL_BUILTIN = "builtin"
DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_TOKENS = 128
DEFAULT_THRESHOLD_PCT = 5.0
ITEM_KEYS = ("id", "prompt", "checker", "system", "max_tokens")


class TaskFileError(UserError):
    """A task suite cannot be found or read, or one of its lines is malformed; the message names file and line."""


class TaskCompareError(UserError):
    """Two task runs cannot be compared because they did not answer the same items."""


@dataclass(frozen=True)
class TaskItem:
    id: str
    prompt: str
    checker: Checker
    line: int
    """1-based line of the item in its file."""
    system: str | None = None
    """None: the default system prompt; "": no system message at all."""
    max_tokens: int = DEFAULT_MAX_TOKENS

    @property
    def system_prompt(self) -> str | None:
        """What is sent as the system message (None for none)."""
        if self.system is None:
            return DEFAULT_SYSTEM
        return self.system or None


@dataclass(frozen=True)
class TaskSuite:
    name: str
    path: Path
    items: tuple[TaskItem, ...]


@dataclass(frozen=True)
class ItemResult:
    suite: str
    id: str
    line: int
    passed: bool
    answer: str
    error: str | None = None
    """Set when the checker itself failed on this answer (the item counts as not passed)."""
    detail: str = ""
    """Why a checked answer failed, in a few words."""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"suite": self.suite, "id": self.id, "line": self.line, "passed": self.passed, "answer": self.answer,
                "error": self.error, "detail": self.detail, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class TaskRun:
    """One model's answers to a set of suites, in suite order."""

    model: Path
    suites: tuple[str, ...]
    results: tuple[ItemResult, ...]
    seconds_by_suite: dict[str, float] = field(default_factory=dict)

    @property
    def suite(self) -> str:
        return ",".join(self.suites)

    @property
    def items(self) -> int:
        return len(self.results)

    @property
    def passed(self) -> int:
        return sum(result.passed for result in self.results)

    @property
    def score(self) -> float:
        """The fraction of all items passed."""
        return self.passed / self.items if self.results else 0.0

    @property
    def by_suite(self) -> dict[str, float]:
        return {name: _fraction_passed(r for r in self.results if r.suite == name) for name in self.suites}

    @property
    def errors(self) -> tuple[ItemResult, ...]:
        """Items whose checker failed on the answer; each counts as not passed."""
        return tuple(result for result in self.results if result.error is not None)

    @property
    def seconds(self) -> float:
        return sum(self.seconds_by_suite.values())

    def warnings(self) -> list[str]:
        """One sentence per item that could not be checked, for the CLI to print."""
        return [f"{r.suite}: item {r.id} (line {r.line}) could not be checked: {r.error}; it counts as failed."
                for r in self.errors]

    def to_json(self, *, include_items: bool = False) -> dict[str, Any]:
        document: dict[str, Any] = {
            "suite": self.suite, "score": self.score, "items": self.items, "passed": self.passed,
            "by_suite": self.by_suite,
            "errors": [{"suite": r.suite, "id": r.id, "line": r.line, "error": r.error} for r in self.errors],
        }
        if include_items:
            document["results"] = [result.to_json() for result in self.results]
        return document


@dataclass(frozen=True)
class SuiteVerdict:
    score: float
    reference_score: float
    degradation_pct: float | None


@dataclass(frozen=True)
class TaskVerdict:
    suite: str
    score: float
    reference_score: float
    degradation_pct: float | None
    """(reference - candidate) / reference * 100; negative when the candidate does better; None when the reference
    passes nothing."""
    recommendation: str
    """"deploy" or "investigate"."""
    threshold_pct: float
    by_suite: dict[str, SuiteVerdict]
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": self.suite, "score": self.score, "reference_score": self.reference_score,
            "degradation_pct": self.degradation_pct, "recommendation": self.recommendation,
            "threshold_pct": self.threshold_pct,
            "by_suite": {name: {"score": v.score, "reference_score": v.reference_score,
                                "degradation_pct": v.degradation_pct} for name, v in self.by_suite.items()},
            "reason": self.reason,
        }


def _fraction_passed(results: Iterable[ItemResult]) -> float:
    outcomes = [result.passed for result in results]
    return sum(outcomes) / len(outcomes) if outcomes else 0.0


# --- loading ---------------------------------------------------------------------------------------------------

def builtin_suite_path(name: str) -> Path:
    return resources_dir() / "eval" / "tasks" / f"{name}.jsonl"


class _LineError(Exception):
    """What is wrong with one line, as a fragment that the loader prefixes with file and line."""


def _parse_item(text: str, seen: dict[str, int], line: int) -> TaskItem:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise _LineError(f"this is not valid JSON ({error.msg} at column {error.colno}); write the item as one "
                         "JSON object on one line") from None
    if not isinstance(document, dict):
        raise _LineError("each line must be a JSON object with `id`, `prompt` and `checker`; fix the line")
    unknown = sorted(set(document) - set(ITEM_KEYS))
    if unknown:
        raise _LineError(f"`{unknown[0]}` is not an item field (the fields are {', '.join(ITEM_KEYS)}); "
                         "remove or rename it")
    item_id = document.get("id")
    if not isinstance(item_id, str) or not item_id.strip():
        raise _LineError("`id` is missing or empty; give the item a unique name such as \"capital-france\"")
    if item_id in seen:
        raise _LineError(f"the id {item_id!r} is already used on line {seen[item_id]}; give each item its own id")
    prompt = document.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _LineError("`prompt` is missing or empty; add the text to send to the model")
    system = document.get("system")
    if system is not None and not isinstance(system, str):
        raise _LineError("`system` must be a string (\"\" for no system prompt); fix the line")
    max_tokens = document.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _LineError("`max_tokens` must be a whole number of at least 1; fix the line")
    if "checker" not in document:
        raise _LineError(f"`checker` is missing; add one such as {{\"type\": \"exact\", \"value\": \"42\"}} "
                         f"(types: {', '.join(CHECKER_TYPES)})")
    try:
        checker = build_checker(document["checker"])
    except CheckerSpecError as error:
        raise _LineError(str(error)) from None
    seen[item_id] = line
    return TaskItem(item_id, prompt, checker, line, system, max_tokens)


def load_suite_file(path: str | Path, name: str | None = None) -> TaskSuite:
    """Read and validate a JSONL task file; raises TaskFileError naming the file and line of the first problem."""
    path = Path(path)
    label = path.name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TaskFileError(f"the task file {path} does not exist; check the path.") from None
    except IsADirectoryError:
        raise TaskFileError(f"{path} is a folder, not a task file; give the path of a .jsonl file.") from None
    except OSError as error:
        raise TaskFileError(f"the task file {path} cannot be read ({error.strerror}); check its permissions.") from None
    items: list[TaskItem] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise TaskFileError(f"{label} line {number}: the line is not UTF-8 text; save the file as UTF-8.") from None
        if not text.strip():
            continue
        try:
            items.append(_parse_item(text, seen, number))
        except _LineError as error:
            raise TaskFileError(f"{label} line {number}: {error}.") from None
    if not items:
        raise TaskFileError(f"{label} holds no items; add one JSON object per line with `id`, `prompt` and `checker`.")
    return TaskSuite(name or path.stem, path, tuple(items))


def load_suite(name: str | Path) -> TaskSuite:
    """A built-in suite by name (`json`, `arithmetic`, `facts`, `code`) or a suite file by path."""
    text = str(name)
    if text == ALL_BUILTIN:
        raise ValueError(f"{ALL_BUILTIN!r} names several suites; load it with load_suites")
    if text in BUILTIN_SUITES:
        path = builtin_suite_path(text)
        if not path.is_file():
            raise TaskFileError(f"the built-in suite {text} is missing ({path} not found); reinstall qdesk.")
        return load_suite_file(path, text)
    path = Path(name)
    if path.exists() or path.suffix == ".jsonl":
        return load_suite_file(path)
    raise TaskFileError(f"there is no task suite called {text!r}; use one of {', '.join(BUILTIN_SUITES)} or "
                        f"{ALL_BUILTIN} (all of them), or the path of a .jsonl file.")


def load_suites(spec: str | Path | Sequence[str | Path | TaskSuite]) -> list[TaskSuite]:
    """Suites from a comma-separated list ("json,arithmetic", "builtin", "my.jsonl") or a sequence of names, paths
    or loaded suites; a suite named twice is loaded once, and two different suites with the same name are told
    apart by their paths."""
    if isinstance(spec, Path):
        entries: list[str | Path | TaskSuite] = [spec]
    elif isinstance(spec, str):
        entries = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        entries = list(spec)
    expanded: list[str | Path | TaskSuite] = []
    for entry in entries:
        expanded.extend(BUILTIN_SUITES if isinstance(entry, str) and entry == ALL_BUILTIN else [entry])
    if not expanded:
        raise TaskFileError(f"no task suite was given; name one of {', '.join(BUILTIN_SUITES)} or {ALL_BUILTIN}, "
                            "or the path of a .jsonl file.")
    suites: list[TaskSuite] = []
    for entry in expanded:
        suite = entry if isinstance(entry, TaskSuite) else load_suite(entry)
        if any(s.path.resolve() == suite.path.resolve() for s in suites):
            continue
        if any(s.name == suite.name for s in suites):
            suite = TaskSuite(str(suite.path), suite.path, suite.items)
        suites.append(suite)
    return suites


# --- checking and running --------------------------------------------------------------------------------------

def check_answer(suite: str, item: TaskItem, answer: str, seconds: float = 0.0) -> ItemResult:
    """Apply an item's checker to an answer; a checker that raises gives a failed result carrying the error."""
    try:
        outcome = item.checker(answer)
    except Exception as error:  # any checker failure is recorded on its item, never lost
        message = str(error).strip() or type(error).__name__
        return ItemResult(suite, item.id, item.line, False, answer, error=message, seconds=seconds)
    return ItemResult(suite, item.id, item.line, outcome.passed, answer, detail=outcome.detail, seconds=seconds)


def _answer(model: LoadedModel, item: TaskItem, cancel: CancelToken | None) -> str:
    sampling = SamplingOptions(temperature=0.0, max_tokens=item.max_tokens, seed=0)
    result = model.chat([{"role": "user", "content": item.prompt}], sampling, system=item.system_prompt,
                        cancel=cancel)
    if cancel is not None and cancel.cancelled:
        raise Cancelled("task evaluation cancelled by the user")
    return result.text


def run_tasks(model_path: str | Path, suites: str | Path | Sequence[str | Path | TaskSuite], *, n_ctx: int = 2048,
              n_threads: int | None = None, n_gpu_layers: int | str = 0, progress: ProgressFn | None = None,
              cancel: CancelToken | None = None, rpc: Sequence[str] = (), loras: Sequence[LoraChoice] = ()) -> TaskRun:
    """Answer every item of `suites` with the model at `model_path` (greedy, seed 0: reproducible), with the LoRA
    adapters `loras` applied, and check each answer. Suites are loaded before the model, so a bad file fails fast.
    An item the engine refuses (a prompt longer than the context) is recorded with the error; a crashed model ends
    the run (ModelCrashed)."""
    loaded = load_suites(suites)
    total = sum(len(suite.items) for suite in loaded)
    report = progress or (lambda _: None)
    if cancel is not None:
        cancel.raise_if_cancelled()
    report(Progress(0, total, "items", f"loading {Path(model_path).name}"))
    model = load_model(model_path, LoadOptions(n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                                               rpc=tuple(rpc), loras=tuple(loras)))
    results: list[ItemResult] = []
    seconds_by_suite: dict[str, float] = {}
    try:
        for suite in loaded:
            suite_started = time.perf_counter()
            for item in suite.items:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                started = time.perf_counter()
                try:
                    answer = _answer(model, item, cancel)
                except ModelCrashed:
                    raise
                except EngineError as error:
                    if not model.alive:
                        raise
                    results.append(ItemResult(suite.name, item.id, item.line, False, "",
                                              error=f"the model could not answer: {error}"))
                else:
                    results.append(check_answer(suite.name, item, answer, time.perf_counter() - started))
                report(Progress(len(results), total, "items", f"{suite.name}: {item.id}"))
            seconds_by_suite[suite.name] = time.perf_counter() - suite_started
    finally:
        model.close()
    return TaskRun(Path(model_path), tuple(suite.name for suite in loaded), tuple(results), seconds_by_suite)


# --- comparing -------------------------------------------------------------------------------------------------

def _passed_by_suite(run: TaskRun) -> dict[str, int]:
    return {name: sum(r.passed for r in run.results if r.suite == name) for name in run.suites}


def _degradation(reference_passed: int, candidate_passed: int) -> float | None:
    """From counts of passed items out of the same items, so that 19 of 20 against 20 is exactly 5%."""
    return None if reference_passed <= 0 else (reference_passed - candidate_passed) * 100 / reference_passed


def compare_runs(reference: TaskRun, candidate: TaskRun, *, threshold_pct: float = DEFAULT_THRESHOLD_PCT
                 ) -> TaskVerdict:
    """Score a candidate's run against the reference's on the same items: "deploy" when the candidate's score is at
    most `threshold_pct` percent (relative) below the reference's, else "investigate"."""
    if threshold_pct < 0:
        raise ValueError(f"threshold_pct must be 0 or more, not {threshold_pct}")
    reference_items = {(r.suite, r.id) for r in reference.results}
    candidate_items = {(r.suite, r.id) for r in candidate.results}
    if reference.suites != candidate.suites or reference_items != candidate_items:
        raise TaskCompareError(f"the runs answered different items (reference: {reference.suite}, "
                               f"{reference.items} items; candidate: {candidate.suite}, {candidate.items} items); "
                               "run both models on the same suites.")
    reference_scores, candidate_scores = reference.by_suite, candidate.by_suite
    reference_passed, candidate_passed = _passed_by_suite(reference), _passed_by_suite(candidate)
    by_suite = {name: SuiteVerdict(candidate_scores[name], reference_scores[name],
                                   _degradation(reference_passed[name], candidate_passed[name]))
                for name in reference.suites}
    degradation = _degradation(reference.passed, candidate.passed)
    if degradation is None:
        recommendation = "investigate"
        reason = (f"the reference passes none of the {reference.items} items, so this suite cannot judge the "
                  "candidate; use a stronger reference or suites it can answer.")
    elif degradation <= threshold_pct:
        recommendation, reason = "deploy", None
    else:
        recommendation = "investigate"
        reason = (f"the candidate passes {candidate.passed} of {candidate.items} items against the reference's "
                  f"{reference.passed}, {degradation:.1f}% worse, above the {threshold_pct:g}% threshold.")
    return TaskVerdict(candidate.suite, candidate.score, reference.score, degradation, recommendation, threshold_pct,
                       by_suite, reason)


__all__ = [
    "ALL_BUILTIN",
    "BUILTIN_SUITES",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SYSTEM",
    "ItemResult",
    "SuiteVerdict",
    "TaskCompareError",
    "TaskFileError",
    "TaskItem",
    "TaskRun",
    "TaskSuite",
    "TaskVerdict",
    "builtin_suite_path",
    "check_answer",
    "compare_runs",
    "load_suite",
    "load_suite_file",
    "load_suites",
    "run_tasks",
]
