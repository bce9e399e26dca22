"""The HTTP side of `qdesk serve`: a small ASGI application (Starlette) over the engine's model workers.

Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`, `POST /v1/completions` (streamed as
server-sent events when `stream` is true). Every error is OpenAI's shape with its status; the server keeps serving.
A request waits for its model's turn (`ModelPool`), and a client that goes away while waiting or generating stops
its generation. With an API key every request needs `Authorization: Bearer KEY` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from converters.core.errors import UserError
from qdesk.chat.engine import ChatResult, ContextOverflow, EngineError, ModelCrashed, TokenEvent
from qdesk.serve.pool import Lease, ModelPool
from qdesk.serve.protocol import (
    ApiError,
    GenerationRequest,
    answer_document,
    chunk_document,
    model_not_found,
    new_id,
    parse_request,
    usage_chunk,
)
from qdesk.serve.stops import StopScanner

DISCONNECT_POLL_S = 0.1
OWNER = "qdesk"


@dataclass(frozen=True)
class RequestRecord:
    """One request as the log shows it."""

    at: float
    """Wall-clock time it arrived (time.time())."""
    client: str
    method: str
    path: str
    status: int
    seconds: float
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


RequestLogger = Callable[[RequestRecord], None]


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status)


def _sse(document: dict[str, Any] | str) -> bytes:
    data = document if isinstance(document, str) else json.dumps(document, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class _Generation:
    """One answer generated on a thread, its events passed to the event loop as they come."""

    def __init__(self, lease: Lease, request: GenerationRequest, on_end: Callable[[], None]) -> None:
        self.lease = lease
        self.request = request
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._on_end = on_end
        self._thread = threading.Thread(target=self._run, name=f"generate {lease.name}", daemon=True)
        self._thread.start()

    def _put(self, kind: str, value: Any) -> None:
        self._call(self.events.put_nowait, (kind, value))

    def _call(self, function: Callable[..., Any], *arguments: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the server stopped meanwhile: nobody is waiting any more
            self._loop.call_soon_threadsafe(function, *arguments)

    def _run(self) -> None:
        model, request = self.lease.model, self.request
        sampling = replace(request.sampling, max_tokens=request.max_tokens or model.n_ctx)

        def on_token(event: TokenEvent) -> None:
            self._put("token", event)

        try:
            if request.kind == "chat":
                result: ChatResult = model.chat(list(request.messages), sampling, on_token=on_token)
            else:
                result = model.complete(request.prompt, sampling, on_token=on_token)
            self._put("done", result)
        except (EngineError, UserError) as error:
            self._put("error", error)
        except BaseException as error:  # nothing may be lost silently on a thread
            self._put("error", error)
        finally:
            self._call(self._on_end)

    def stop(self) -> None:
        self.lease.model.stop()


def _engine_error(error: BaseException, model: str) -> ApiError:
    if isinstance(error, ContextOverflow):
        return ApiError(400, str(error), param="messages", code="context_length_exceeded")
    if isinstance(error, ModelCrashed):
        return ApiError(500, str(error), kind="server_error", param="model", code="model_crashed")
    if isinstance(error, EngineError | UserError):
        return ApiError(500, f"{model} could not answer: {error}", kind="server_error")
    return ApiError(500, f"internal error ({type(error).__name__}: {error}); the server log has more.",
                    kind="server_error")


class _Answer:
    """An answer's text through the stop sequences, with its token count and finish reason."""

    def __init__(self, request: GenerationRequest) -> None:
        self.scanner = StopScanner(request.stop)
        self.tokens = 0
        """Tokens up to the one that completed a stop sequence (those the engine made after it are not counted)."""
        self.prompt_tokens = 0
        self.finish_reason = "length"
        self._streamed = 0

    def token(self, event: TokenEvent) -> str:
        """The text that may be shown now."""
        self._streamed += len(event.text)
        if self.scanner.stopped:
            return ""
        self.tokens += 1
        return self.scanner.feed(event.text)

    def done(self, result: ChatResult) -> str:
        """The rest of the text once the engine has finished."""
        tail = self.scanner.feed(result.text[self._streamed:]) + self.scanner.finish()
        self.prompt_tokens = result.stats.prompt_tokens
        self.finish_reason = "stop" if self.scanner.stopped or result.stats.stop_reason == "stop" else "length"
        return tail


class ServeApp:
    """The application and what it serves; `asgi` is what an ASGI server runs."""

    def __init__(self, pool: ModelPool, *, api_key: str | None = None, cors_origins: tuple[str, ...] = (),
                 logger: RequestLogger | None = None) -> None:
        self.pool = pool
        self.api_key = api_key
        self.logger = logger
        self.started = int(time.time())
        self._background: set[asyncio.Task[None]] = set()
        routes = [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{name:path}", self.get_model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        middleware = []
        if cors_origins:
            middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins),
                                         allow_methods=["GET", "POST", "OPTIONS"],
                                         allow_headers=["Authorization", "Content-Type"]))
        app = Starlette(routes=routes, middleware=middleware,
                        exception_handlers={HTTPException: self._http_error, ApiError: self._api_error})
        self.asgi: ASGIApp = _Logged(_Authorised(app, api_key), self._record)

    def _record(self, record: RequestRecord) -> None:
        if self.logger is not None:
            self.logger(record)

    @staticmethod
    async def _http_error(_request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = {404: "There is no such route; this server answers /v1/models, /v1/chat/completions and "
                        "/v1/completions.",
                   405: "This route does not take that method."}.get(error.status_code, str(error.detail))
        return _error_response(ApiError(error.status_code, message, kind=kind))

    @staticmethod
    async def _api_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        request.scope.setdefault("state", {})["error"] = error.message
        return _error_response(error)

    def _model_document(self, name: str) -> dict[str, Any]:
        path = self.pool.path_of(name)
        created = int(path.stat().st_mtime) if path.exists() else self.started
        return {"id": name, "object": "model", "created": created, "owned_by": OWNER}

    async def list_models(self, _request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_document(name) for name in self.pool.names]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.pool.names:
            raise model_not_found(name, self.pool.names)
        return JSONResponse(self._model_document(name))

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def _generate(self, http: Request, kind: str) -> Response:
        try:
            body = await http.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON; send a JSON object.") from None
        request = parse_request(kind, body)
        state = http.scope.setdefault("state", {})
        state["model"] = request.model
        if request.model not in self.pool.names:
            raise model_not_found(request.model, self.pool.names)
        client = request.user or (http.client.host if http.client else "unknown")
        generation, first = await self._start(http, request, client)
        if generation is None:
            return Response(status_code=499)  # the client left while waiting; nobody reads this
        answer = _Answer(request)
        if request.stream:
            return StreamingResponse(self._stream(generation, answer, first, state), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(http, generation, answer, first, state)

    async def _start(self, http: Request, request: GenerationRequest, client: str
                     ) -> tuple[_Generation | None, tuple[str, Any] | None]:
        """Wait for the model's turn and the answer's first event, watching for the client leaving meanwhile:
        errors found before the first token (a prompt too long, a model that cannot load) get a real status."""
        loop = asyncio.get_running_loop()

        async def begin() -> tuple[_Generation, tuple[str, Any]]:
            lease = await self.pool.acquire(request.model, client)
            released = False

            def release() -> None:
                nonlocal released
                if not released:
                    released = True
                    handing_on = loop.create_task(self.pool.release(lease))
                    self._background.add(handing_on)
                    handing_on.add_done_callback(self._background.discard)

            try:
                generation = _Generation(lease, request, release)
            except BaseException:
                release()
                raise
            try:
                return generation, await generation.events.get()
            except asyncio.CancelledError:
                generation.stop()
                raise

        task = asyncio.ensure_future(begin())
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await http.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None, None
        generation, first = task.result()
        if first[0] == "error":
            raise _engine_error(first[1], request.model)
        return generation, first

    async def _events(self, generation: _Generation, first: tuple[str, Any] | None) -> AsyncIterator[tuple[str, Any]]:
        if first is not None:
            yield first
        while True:
            event = await generation.events.get()
            yield event
            if event[0] in ("done", "error"):
                return

    async def _stream(self, generation: _Generation, answer: _Answer, first: tuple[str, Any] | None,
                      state: dict[str, Any]) -> AsyncIterator[bytes]:
        request = generation.request
        answer_id = new_id(request.kind)
        finished = False
        try:
            if request.kind == "chat":
                yield _sse(chunk_document(request, answer_id, "", first=True))
            async for kind, value in self._events(generation, first):
                if kind == "token":
                    text = answer.token(value)
                    if text:
                        yield _sse(chunk_document(request, answer_id, text))
                    if answer.scanner.stopped:
                        generation.stop()
                elif kind == "done":
                    tail = answer.done(value)
                    if tail:
                        yield _sse(chunk_document(request, answer_id, tail))
                    yield _sse(chunk_document(request, answer_id, None if request.kind == "chat" else "",
                                              answer.finish_reason))
                    if request.include_usage:
                        yield _sse(usage_chunk(request, answer_id, answer.prompt_tokens, answer.tokens))
                    yield _sse("[DONE]")
                    finished = True
                else:
                    error = _engine_error(value, request.model)
                    state["error"] = error.message
                    yield _sse(error.to_json())
                    yield _sse("[DONE]")
                    finished = True
        finally:
            if not finished:
                generation.stop()  # the client went away: end the generation now
                state["finish_reason"] = "disconnected"
            else:
                state["finish_reason"] = answer.finish_reason
            state["prompt_tokens"] = answer.prompt_tokens
            state["completion_tokens"] = answer.tokens

    async def _whole(self, http: Request, generation: _Generation, answer: _Answer, first: tuple[str, Any] | None,
                     state: dict[str, Any]) -> Response:
        request = generation.request
        pieces: list[str] = []
        events = self._events(generation, first)
        while True:
            pending = asyncio.ensure_future(events.__anext__())
            while not pending.done():
                await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
                if not pending.done() and await http.is_disconnected():
                    generation.stop()
                    state["finish_reason"] = "disconnected"
            kind, value = pending.result()
            if kind == "token":
                pieces.append(answer.token(value))
                if answer.scanner.stopped:
                    generation.stop()
            elif kind == "done":
                pieces.append(answer.done(value))
                break
            else:
                raise _engine_error(value, request.model)
        state.setdefault("finish_reason", answer.finish_reason)
        state["prompt_tokens"] = answer.prompt_tokens
        state["completion_tokens"] = answer.tokens
        return JSONResponse(answer_document(request, new_id(request.kind), "".join(pieces), answer.finish_reason,
                                            answer.prompt_tokens, answer.tokens))


class _Authorised:
    """Every request needs `Authorization: Bearer KEY` when the server has a key (CORS preflights aside)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            error = ApiError(401, "Incorrect or missing API key; send it as 'Authorization: Bearer KEY'.",
                             code="invalid_api_key")
            scope.setdefault("state", {})["error"] = error.message
            await _error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _Logged:
    """Records every request (status, model, tokens, time) once its response is complete."""

    def __init__(self, app: ASGIApp, record: Callable[[RequestRecord], None]) -> None:
        self.app = app
        self.record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, at = time.perf_counter(), time.time()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        state = scope.setdefault("state", {})
        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client")
            self.record(RequestRecord(
                at=at, client=f"{client[0]}:{client[1]}" if client else "unknown", method=scope["method"],
                path=scope["path"], status=status or 499, seconds=time.perf_counter() - started,
                model=state.get("model"), prompt_tokens=int(state.get("prompt_tokens", 0)),
                completion_tokens=int(state.get("completion_tokens", 0)), finish_reason=state.get("finish_reason"),
                error=state.get("error")))
