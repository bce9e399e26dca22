"""HTTP to the Hub through huggingface_hub's shared httpx2 client: error translation, streamed GETs that keep the
token off other hosts, waits between retries that a cancel interrupts, and the client's configuration for the calls
qdesk leaves to huggingface_hub (`library_requests`).

huggingface_hub's `http_backoff` (behind `HfApi.list_models`, among others) retries a network error or a 429/5xx
answer five times over 23 s, logging each try, and its shared client has no timeout. Its documented way to
configure that client is `set_client_factory`: qdesk installs, once, a client built like the default one (the same
request hooks, so offline mode is still enforced) whose requests made inside `library_requests(settings)` get the
settings' timeout where they set none, and fail at once on a network error or a 429/5xx answer (as an error
`http_backoff` does not retry), so that qdesk's own retry policy decides. Outside that block the client behaves as
huggingface_hub's default one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urljoin

from converters.core.jobs import CancelToken
from qdesk.hub.errors import OFFLINE_MODE, HubError, HubOfflineError, hub_error
from qdesk.hub.settings import HubSettings

if TYPE_CHECKING:
    import httpx2
    from huggingface_hub import HfFileMetadata

__all__ = ["RETRYABLE_STATUS", "check_online", "file_metadata", "interrupt", "is_retryable", "library_requests",
           "open_stream", "translated", "wait"]

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_REDIRECTS = 10
_SCOPE: contextvars.ContextVar[HubSettings | None] = contextvars.ContextVar("qdesk_hub_requests", default=None)
_INSTALL_LOCK = threading.Lock()
_installed = False


@functools.cache
def _client_class() -> type[httpx2.Client]:
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    class NetworkFailure(httpx2.TransportError):
        """A network error inside `library_requests`: a TransportError (so it reads as "cannot be reached"), but not
        one of those `http_backoff` retries."""

    class QdeskHubClient(httpx2.Client):
        def send(self, request: httpx2.Request, **options: Any) -> httpx2.Response:
            settings = _SCOPE.get()
            if settings is None:
                return super().send(request, **options)
            if all(value is None for value in (request.extensions.get("timeout") or {}).values()):
                request.extensions["timeout"] = httpx2.Timeout(settings.timeout_s).as_dict()
            try:
                response = super().send(request, **options)
            except NetworkFailure:
                raise
            except httpx2.TransportError as error:
                raise NetworkFailure(f"{type(error).__name__}: {error}", request=request) from error
            if response.status_code in RETRYABLE_STATUS:
                response.read()
                hf_raise_for_status(response)
            return response

    return QdeskHubClient


def _install_client() -> None:
    global _installed
    with _INSTALL_LOCK:
        if _installed:
            return
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils import get_session

        default = get_session()
        hooks, follow_redirects, timeout = default.event_hooks, default.follow_redirects, default.timeout
        client_class = _client_class()
        set_client_factory(lambda: client_class(event_hooks=hooks, follow_redirects=follow_redirects,
                                                timeout=timeout))
        _installed = True


@contextlib.contextmanager
def library_requests(settings: HubSettings) -> Iterator[None]:
    """The requests huggingface_hub makes inside the block get `settings.timeout_s` where they set no timeout, and
    raise at once on a network error or a 429/5xx answer instead of being retried by huggingface_hub."""
    _install_client()
    token = _SCOPE.set(settings)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def check_online(settings: HubSettings) -> None:
    """HubOfflineError when offline mode is on: no request is made at all then."""
    if settings.offline:
        raise HubOfflineError(OFFLINE_MODE)


@contextlib.contextmanager
def translated(settings: HubSettings, repo_id: str | None, *, revision: str | None = None,
               path: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's and httpx2's exceptions raised inside the block into one-sentence HubErrors."""
    try:
        yield
    except HubError:
        raise
    except Exception as error:
        translation = hub_error(error, repo_id=repo_id, endpoint=settings.endpoint, has_token=settings.has_token,
                                revision=revision, path=path)
        if translation is None:
            raise
        raise translation from error


def is_retryable(error: BaseException) -> bool:
    """A network error or an HTTP status worth another try (timeouts, resets, 429, 5xx)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, httpx2.TransportError):
        return True
    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code in RETRYABLE_STATUS
    cause = error.__cause__  # a HubError, or huggingface_hub's LocalEntryNotFoundError, says why in its cause
    return cause is not None and cause is not error and is_retryable(cause)


def wait(seconds: float, cancel: CancelToken | None) -> None:
    """Sleep `seconds`, waking at once (and raising Cancelled) when `cancel` is set."""
    woken = threading.Event()
    unsubscribe: Callable[[], None] = (cancel.subscribe(woken.set) if cancel is not None else lambda: None)
    try:
        woken.wait(seconds)
    finally:
        unsubscribe()
    if cancel is not None:
        cancel.raise_if_cancelled()


def interrupt(response: httpx2.Response) -> None:
    """Stop a streamed response from another thread: shutting its socket down wakes a read blocked on it (closing
    alone would leave that read waiting for its timeout)."""
    import socket

    stream = response.extensions.get("network_stream")
    raw = stream.get_extra_info("socket") if stream is not None else None
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        response.close()


def file_metadata(settings: HubSettings, url: str) -> HfFileMetadata:
    """huggingface_hub's HEAD of a resolve URL: the commit, the ETag that names the blob in the cache, the size."""
    from huggingface_hub import get_hf_file_metadata

    from qdesk import __version__

    return get_hf_file_metadata(url, token=settings.token or False, timeout=settings.timeout_s,
                                library_name="qdesk", library_version=__version__, endpoint=settings.endpoint)


@contextlib.contextmanager
def open_stream(settings: HubSettings, url: str, *, start: int = 0, stop: int | None = None,
                on_open: Callable[[httpx2.Response], None] | None = None) -> Iterator[httpx2.Response]:
    """A streamed GET of bytes [`start`, `stop`) of `url`, following redirects by hand so that the token goes to the
    Hub endpoint only (a CDN gets a signed URL, never the token). Raises huggingface_hub's HTTP errors (use
    `translated`) and httpx2's network errors. `on_open` sees the response before its body is read (to close it
    from another thread on cancel)."""
    import httpx2
    from huggingface_hub.utils import get_session, hf_raise_for_status

    client = get_session()
    extra = {"Accept-Encoding": "identity"}
    if start > 0 or stop is not None:
        extra["Range"] = f"bytes={start}-{'' if stop is None else stop - 1}"
    timeout = httpx2.Timeout(settings.timeout_s)
    for _ in range(_MAX_REDIRECTS):
        headers = {**settings.headers(authorized=settings.same_origin(url)), **extra}
        request = client.build_request("GET", url, headers=headers, timeout=timeout)
        response = client.send(request, stream=True, follow_redirects=False)
        if response.has_redirect_location:
            url = urljoin(url, response.headers["Location"])
            response.close()
            continue
        try:
            if response.status_code >= 400:
                response.read()  # error bodies are small; huggingface_hub reads them for its messages
                hf_raise_for_status(response)
            if on_open is not None:
                on_open(response)
            yield response
        finally:
            response.close()
        return
    raise HubError(f"The Hub redirected {url} more than {_MAX_REDIRECTS} times; try again later.")
