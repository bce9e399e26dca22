"""Where the Hub is and how to talk to it: endpoint, cache folder, token, offline mode, timeouts and retries.

Everything is read the standard huggingface_hub way, at call time: `HF_ENDPOINT` (any server that speaks the Hub's
API: the Hub, a public mirror, a self-hosted one), `HF_HUB_CACHE` / `HF_HOME` (`hub_cache_dir`), `HF_HUB_OFFLINE`
(the environment now, or huggingface_hub's own constant read at its import), and the token from
`huggingface_hub.get_token()` (HF_TOKEN, or the file `hf auth login` writes). The token is kept out of `repr` and
is never printed or logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["HubSettings", "RetryPolicy", "hub_cache_dir"]

_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a transfer after a network error: `attempts` tries in a row without progress, waiting
    `first_delay_s`, then twice as long each time up to `max_delay_s`. Progress resets the count."""

    attempts: int = 6
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0

    def delay(self, failures: int) -> float:
        """The wait before the next try after `failures` (1, 2, …) failed tries in a row."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** max(0, failures - 1))


def _env_true(name: str) -> bool:
    return (os.environ.get(name) or "").strip().upper() in _TRUE


def _environment_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(os.path.expandvars(value)).expanduser() if value else None


def hub_cache_dir() -> Path:
    """The Hugging Face cache folder the environment names now, the way huggingface_hub resolves it at its import:
    HF_HUB_CACHE, else the older HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub,
    else ~/.cache/huggingface/hub. Read at every call (huggingface_hub's constant is fixed when it is imported)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if (folder := _environment_path(name)) is not None:
            return folder
    if (home := _environment_path("HF_HOME")) is not None:
        return home / "hub"
    cache = _environment_path("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return cache / "huggingface" / "hub"


@dataclass(frozen=True)
class HubSettings:
    """How qdesk reaches the Hub. Build it with `from_environment()`; tests pass their own endpoint and cache."""

    endpoint: str
    cache_dir: Path
    token: str | None = field(default=None, repr=False)
    offline: bool = False
    timeout_s: float = 15.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def from_environment(
        cls,
        *,
        endpoint: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
        offline: bool | None = None,
        timeout_s: float = 15.0,
        retry: RetryPolicy | None = None,
    ) -> HubSettings:
        """The settings the environment gives, each overridable. `token=False` sends none; `None` reads the
        logged-in one (`huggingface_hub.get_token()`)."""
        from huggingface_hub import constants, get_token

        if endpoint is None:
            endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        if offline is None:
            offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or constants.is_offline_mode()
        if token is None or token is True:
            token = get_token()
        return cls(
            endpoint=endpoint.rstrip("/"),
            cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir(),
            token=token or None,
            offline=offline,
            timeout_s=timeout_s,
            retry=retry or RetryPolicy(),
        )

    @property
    def has_token(self) -> bool:
        return self.token is not None

    def headers(self, *, authorized: bool = True) -> dict[str, str]:
        """Request headers: qdesk's user agent, and the token when `authorized` and there is one."""
        from huggingface_hub.utils import build_hf_headers

        from qdesk import __version__

        token: str | bool = self.token if authorized and self.token else False
        return build_hf_headers(token=token, library_name="qdesk", library_version=__version__)

    def same_origin(self, url: str) -> bool:
        """Whether `url` is served by the Hub endpoint itself (the token may go there, never to a CDN)."""
        return _origin(url) == _origin(self.endpoint)

    def api(self) -> HfApi:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token or False, library_name="qdesk")


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme, 0)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default_port
