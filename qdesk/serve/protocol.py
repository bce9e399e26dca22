"""The OpenAI API's shapes, as far as qdesk serves them: requests read and checked, answers and errors written.

Requests are read leniently (fields qdesk does not use are ignored, as OpenAI's own server ignores unknown ones) and
checked strictly (a wrong type or a value out of range is a 400 naming the field). `top_k` and `repeat_penalty` are
accepted too, as llama.cpp's server accepts them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from qdesk.chat.engine import SamplingOptions

MAX_STOP_SEQUENCES = 4
SEED_LIMIT = 2**31 - 1
MIN_TOP_P = 1e-6
DEFAULT_SAMPLING = SamplingOptions(temperature=1.0, top_p=1.0, top_k=40, repeat_penalty=1.0)
"""OpenAI's defaults (temperature 1, top-p 1, no repetition penalty) with llama.cpp's top-k of 40."""


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code

    def to_json(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def model_not_found(name: str, offered: list[str]) -> ApiError:
    listing = ", ".join(offered[:8]) + (", …" if len(offered) > 8 else "")
    return ApiError(404, f"The model '{name}' does not exist on this server; GET /v1/models lists the ones it "
                         f"serves ({listing or 'none'}).", param="model", code="model_not_found")


@dataclass(frozen=True)
class GenerationRequest:
    """One chat or completion request, checked."""

    kind: str
    """"chat" or "completion"."""
    model: str
    messages: tuple[dict[str, str], ...] = ()
    prompt: str = ""
    sampling: SamplingOptions = field(default_factory=lambda: DEFAULT_SAMPLING)
    max_tokens: int | None = None
    """None: as many as the context leaves room for."""
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    user: str | None = None


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number from {low:g} to {high:g}, not {value!r}.", param=name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a whole number from {low} to {high}, not {value!r}.", param=name)
    return value


def _text_content(content: Any, index: int) -> str:
    """A message's content: a string, or a list of text parts (other kinds of parts are refused)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        pieces = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{index}].content has a part that is not text; this server reads "
                                    "text only.", param=f"messages[{index}].content")
            pieces.append(part["text"])
        return "".join(pieces)
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts.",
                   param=f"messages[{index}].content")


def _messages(body: Mapping[str, Any]) -> tuple[dict[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.", param="messages")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{index}] must be an object with a 'role' and a 'content'.",
                           param=f"messages[{index}]")
        role = "system" if message["role"] == "developer" else message["role"]
        checked.append({"role": role, "content": _text_content(message.get("content"), index)})
    return tuple(checked)


def _prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request on this server).", param="prompt")
    return prompt


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(item, str) and item for item in stops)):
        raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOP_SEQUENCES} non-empty strings.",
                       param="stop")
    return tuple(stops)


def parse_request(kind: str, body: Any) -> GenerationRequest:
    """A chat (`kind` "chat") or completion request from its JSON body; ApiError(400) naming what is wrong."""
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the name of a model from GET /v1/models.", param="model")
    if body.get("n", 1) != 1:
        raise ApiError(400, "'n' must be 1 on this server (one answer per request).", param="n")
    if kind == "completion" and body.get("echo"):
        raise ApiError(400, "'echo' is not supported on this server.", param="echo")
    maximum = _integer(body, "max_completion_tokens", 1, 1 << 30)
    maximum = _integer(body, "max_tokens", 1, 1 << 30) if maximum is None else maximum
    seed = _integer(body, "seed", -(1 << 63), (1 << 64) - 1)
    values: dict[str, Any] = {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0),
        "top_k": _integer(body, "top_k", 0, 1 << 20),
        "repeat_penalty": _number(body, "repeat_penalty", 0.01, 10.0),
        "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0),
        "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0),
    }
    given = {name: value for name, value in values.items() if value is not None}
    if given.get("top_p") == 0:
        given["top_p"] = MIN_TOP_P  # the engine wants top-p above 0; this keeps only the likeliest token
    sampling = replace(DEFAULT_SAMPLING, **given, seed=(seed % SEED_LIMIT) if seed is not None
                       else 1 + secrets.randbelow(SEED_LIMIT - 1))
    options = body.get("stream_options")
    user = body.get("user")
    return GenerationRequest(
        kind=kind, model=model,
        messages=_messages(body) if kind == "chat" else (),
        prompt=_prompt(body) if kind == "completion" else "",
        sampling=sampling, max_tokens=maximum, stop=_stops(body), stream=bool(body.get("stream", False)),
        include_usage=isinstance(options, Mapping) and bool(options.get("include_usage")),
        user=user if isinstance(user, str) else None,
    )


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def answer_document(request: GenerationRequest, answer_id: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """The whole answer of a request that was not streamed."""
    if request.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish_reason, "logprobs": None}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        kind = "text_completion"
    return {"id": answer_id, "object": kind, "created": int(time.time()), "model": request.model,
            "choices": [choice], "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chunk_document(request: GenerationRequest, answer_id: str, text: str | None, finish_reason: str | None = None,
                   *, first: bool = False) -> dict[str, Any]:
    """One server-sent event of a streamed answer."""
    if request.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        kind = "text_completion"
    return {"id": answer_id, "object": kind, "created": int(time.time()), "model": request.model,
            "choices": [choice], "system_fingerprint": None}


def usage_chunk(request: GenerationRequest, answer_id: str, prompt_tokens: int, completion_tokens: int
                ) -> dict[str, Any]:
    """The last event when `stream_options.include_usage` is set: no choices, the usage."""
    kind = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
    return {"id": answer_id, "object": kind, "created": int(time.time()), "model": request.model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}
