"""Checkers for task evaluation: each decides whether one model answer passes one item.

A checker is described in a task file by a JSON object with a `type` and that type's parameters, for example
`{"type": "regex", "pattern": "\\\\bParis\\\\b", "flags": "i"}`. `build_checker` validates the description once,
when the file is loaded (a bad regular expression or JSON schema is the task file's fault, reported with its line),
and returns a `Checker` that is then called on each answer.

| type              | parameters                                | passes when                                       |
|-------------------|-------------------------------------------|---------------------------------------------------|
| `exact`           | `value` and/or `values` (alternatives)    | the normalized answer equals a normalized value   |
| `regex`           | `pattern`, optional `flags` (from "imsx") | `re.search` finds the pattern in the answer       |
| `contains`        | `value`                                   | the value occurs in the answer, ignoring case     |
| `json_schema`     | `schema`                                  | the first JSON value in the answer matches it     |
| `python_compiles` | none                                      | the answer's code compiles (it is never executed) |
"""

from __future__ import annotations

import json
import re
import textwrap
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import jsonschema.exceptions
from jsonschema.validators import validator_for

CHECKER_TYPES = ("exact", "regex", "contains", "json_schema", "python_compiles")
REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)
_WRAPPING = " \t\r\n'\"`"
_NOT_COMPILING = (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError)


class CheckerSpecError(ValueError):
    """A checker description is invalid; the message is a sentence fragment naming the field and what to do."""


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    detail: str = ""
    """Why the answer failed, in a few words ("" when it passed)."""


AnswerCheck = Callable[[str], CheckOutcome]


@dataclass(frozen=True)
class Checker:
    """A validated checker description and the function that applies it to an answer."""

    type: str
    params: Mapping[str, Any]
    check: AnswerCheck = field(compare=False, repr=False)

    def __call__(self, answer: str) -> CheckOutcome:
        return self.check(answer)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, **self.params}


@dataclass(frozen=True)
class FoundJson:
    """A JSON value found in an answer (a wrapper, so that a found `null` differs from nothing found)."""

    value: Any


def normalize_answer(text: str) -> str:
    """The comparable form of a short answer: case-folded, whitespace collapsed, without surrounding quotes or
    backticks and without a trailing period."""
    previous = None
    text = " ".join(text.split())
    while text != previous:
        previous = text
        text = text.strip(_WRAPPING)
        if text.endswith("."):
            text = text[:-1]
    return text.casefold()


def first_fenced_block(text: str) -> str | None:
    """The content of the first ``` fenced block (an unclosed fence runs to the end), or None."""
    match = _FENCE.search(text)
    return match.group(1) if match else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _first_json_in(text: str) -> FoundJson | None:
    stripped = text.strip()
    try:
        return FoundJson(_DECODER.decode(stripped))
    except ValueError:
        pass
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = _DECODER.raw_decode(text, match.start())
        except ValueError:
            continue
        return FoundJson(value)
    return None


def extract_json(answer: str) -> FoundJson | None:
    """The first JSON value in an answer: looked for inside the first ``` fence if there is one, then in the whole
    answer; either the whole text, or the first `{...}` or `[...]` that parses."""
    fenced = first_fenced_block(answer)
    if fenced is not None:
        found = _first_json_in(fenced)
        if found is not None:
            return found
    return _first_json_in(answer)


def extract_code(answer: str) -> str:
    """The code in an answer: the first ``` fenced block if there is one, else the whole answer."""
    fenced = first_fenced_block(answer)
    return textwrap.dedent(fenced if fenced is not None else answer)


def python_compiles(code: str) -> CheckOutcome:
    """Whether `code` compiles as a Python module; it is compiled only, never executed."""
    if not code.strip():
        return CheckOutcome(False, "no code")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(code, "<answer>", "exec")
    except _NOT_COMPILING as error:
        line = f" (line {error.lineno})" if isinstance(error, SyntaxError) and error.lineno else ""
        return CheckOutcome(False, f"does not compile: {type(error).__name__}{line}")
    return CheckOutcome(True)


def _outcome(passed: bool, detail: str) -> CheckOutcome:
    return CheckOutcome(True) if passed else CheckOutcome(False, detail)


def _require_keys(params: Mapping[str, Any], kind: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = f"takes only {', '.join(f'`{key}`' for key in allowed)}" if allowed else "takes no parameters"
        raise CheckerSpecError(f"`checker.{unknown[0]}` is not a parameter of the {kind} checker, which {takes}; "
                               "remove or rename it")


def _text_param(params: Mapping[str, Any], key: str, kind: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise CheckerSpecError(f"the {kind} checker needs `checker.{key}` as a non-empty string; add it")
    return value


def _exact(params: Mapping[str, Any]) -> AnswerCheck:
    _require_keys(params, "exact", ("value", "values"))
    expected: list[str] = []
    if "value" in params:
        expected.append(_text_param(params, "value", "exact"))
    if "values" in params:
        values = params["values"]
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
            raise CheckerSpecError("`checker.values` must be a non-empty list of non-empty strings; fix the list")
        expected.extend(values)
    if not expected:
        raise CheckerSpecError("the exact checker needs `checker.value` (or `checker.values`, a list of "
                               "alternatives); add the expected answer")
    accepted = frozenset(normalize_answer(value) for value in expected)
    shown = " or ".join(repr(value) for value in expected)

    def check(answer: str) -> CheckOutcome:
        return _outcome(normalize_answer(answer) in accepted, f"expected {shown}")

    return check


def _regex(params: Mapping[str, Any]) -> AnswerCheck:
    _require_keys(params, "regex", ("pattern", "flags"))
    pattern = _text_param(params, "pattern", "regex")
    flag_letters = params.get("flags", "")
    if not isinstance(flag_letters, str) or any(letter not in REGEX_FLAGS for letter in flag_letters):
        raise CheckerSpecError(f"`checker.flags` must be a string of the letters {', '.join(REGEX_FLAGS)}; "
                               "fix the flags")
    flags = 0
    for letter in flag_letters:
        flags |= REGEX_FLAGS[letter]
    try:
        compiled = re.compile(pattern, flags)
    except re.error as error:
        raise CheckerSpecError(f"`checker.pattern` is not a valid regular expression ({error}); "
                               "fix the pattern") from None

    def check(answer: str) -> CheckOutcome:
        return _outcome(compiled.search(answer) is not None, f"no match for /{pattern}/")

    return check


def _contains(params: Mapping[str, Any]) -> AnswerCheck:
    _require_keys(params, "contains", ("value",))
    value = _text_param(params, "value", "contains")
    folded = value.casefold()

    def check(answer: str) -> CheckOutcome:
        return _outcome(folded in answer.casefold(), f"{value!r} not in the answer")

    return check


def _json_schema(params: Mapping[str, Any]) -> AnswerCheck:
    _require_keys(params, "json_schema", ("schema",))
    schema = params.get("schema")
    if not isinstance(schema, dict | bool):
        raise CheckerSpecError("the json_schema checker needs `checker.schema` as a JSON schema (an object); add it")
    validator_class = validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except jsonschema.exceptions.SchemaError as error:
        where = "/".join(str(part) for part in error.path)
        at = f" at `{where}`" if where else ""
        raise CheckerSpecError(f"`checker.schema` is not a valid JSON schema{at} ({error.message}); "
                               "fix the schema") from None
    validator = validator_class(schema)

    def check(answer: str) -> CheckOutcome:
        found = extract_json(answer)
        if found is None:
            return CheckOutcome(False, "no JSON value found")
        error = jsonschema.exceptions.best_match(validator.iter_errors(found.value))
        if error is None:
            return CheckOutcome(True)
        return CheckOutcome(False, f"JSON does not match the schema: {error.message}")

    return check


def _python_compiles(params: Mapping[str, Any]) -> AnswerCheck:
    _require_keys(params, "python_compiles", ())

    def check(answer: str) -> CheckOutcome:
        return python_compiles(extract_code(answer))

    return check


_FACTORIES: dict[str, Callable[[Mapping[str, Any]], AnswerCheck]] = {
    "exact": _exact,
    "regex": _regex,
    "contains": _contains,
    "json_schema": _json_schema,
    "python_compiles": _python_compiles,
}


def build_checker(description: Any) -> Checker:
    """Validate a checker description (`{"type": ..., ...params}`) and return its Checker; raises
    CheckerSpecError with a fragment like "`checker.pattern` is not a valid regular expression (...); fix it"."""
    if not isinstance(description, dict):
        raise CheckerSpecError("`checker` must be a JSON object such as {\"type\": \"exact\", \"value\": \"42\"}; "
                               "fix the line")
    kind = description.get("type")
    if kind not in _FACTORIES:
        got = "" if kind is None else f" (not {json.dumps(kind)})"
        raise CheckerSpecError(f"`checker.type` must be one of {', '.join(CHECKER_TYPES)}{got}; fix the line")
    params = {key: value for key, value in description.items() if key != "type"}
    return Checker(kind, params, _FACTORIES[kind](params))


__all__ = [
    "CHECKER_TYPES",
    "AnswerCheck",
    "CheckOutcome",
    "Checker",
    "CheckerSpecError",
    "FoundJson",
    "build_checker",
    "extract_code",
    "extract_json",
    "first_fenced_block",
    "normalize_answer",
    "python_compiles",
]
