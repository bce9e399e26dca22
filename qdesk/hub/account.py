"""Logging in to the Hub from the app: the token checked against the configured endpoint, then kept where
huggingface_hub reads it.

`log_in(token)` asks the endpoint whose token it is (`HfApi.whoami`, at `HubSettings.endpoint`, so a mirror works) and
writes it to huggingface_hub's token file (`huggingface_hub.constants.HF_TOKEN_PATH`, the file `hf auth login` writes
and `huggingface_hub.get_token()` reads, readable by the user only); from then on `HubSettings.from_environment()`
sends it, as it does the command line's. `log_out()` is huggingface_hub's `logout`. The token is never logged or
shown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from converters.core.atomic import atomic_output
from qdesk.hub.errors import HubAccessError, HubError
from qdesk.hub.http import check_online, library_requests, translated
from qdesk.hub.settings import HubSettings

__all__ = ["Account", "account", "log_in", "log_out", "token_file"]


@dataclass(frozen=True)
class Account:
    has_token: bool
    from_environment: bool
    """The token comes from HF_TOKEN (the environment), which the app cannot change."""


def token_file() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_TOKEN_PATH)


def account() -> Account:
    """Whether a token is set now, and where from (no request)."""
    from huggingface_hub import get_token

    environment = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    return Account(bool(get_token()), environment)


def who_owns(token: str, settings: HubSettings | None = None) -> str:
    """The user name the endpoint gives `token`; HubAccessError when it refuses the token."""
    settings = settings or HubSettings.from_environment(token=False)
    check_online(settings)
    try:
        with translated(settings, None), library_requests(settings):
            answer = settings.api().whoami(token=token)
    except HubError as error:
        if "401" in str(error) or "403" in str(error) or isinstance(error, HubAccessError):
            raise HubAccessError(f"{settings.endpoint} does not accept this token; copy it again from your "
                                 "account's Access Tokens page.") from error
        raise
    except Exception as error:  # huggingface_hub's HTTP error for a refused token
        raise HubAccessError(f"{settings.endpoint} does not accept this token ({type(error).__name__}); copy it "
                             "again from your account's Access Tokens page.") from error
    return str(answer.get("name") or "?")


def log_in(token: str, settings: HubSettings | None = None) -> str:
    """Check `token` with the endpoint, then keep it where huggingface_hub reads it; the user's name."""
    token = token.strip()
    if not token:
        raise HubAccessError("Paste a token first (your account's Settings → Access Tokens on the Hub).")
    name = who_owns(token, settings)
    path = token_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as staging:
            staging.touch(mode=0o600)
            staging.chmod(0o600)
            staging.write_text(token, encoding="utf-8")
        path.chmod(0o600)
    except OSError as error:
        raise HubError(f"Cannot save the token to {path} ({error.strerror or error}); check that you can write "
                       "there.") from error
    return name


def log_out() -> None:
    """Forget the saved token (huggingface_hub's own logout); a token in HF_TOKEN stays, and the error says so."""
    from huggingface_hub import logout

    try:
        logout()
    except OSError as error:
        raise HubError("The saved token is gone, but HF_TOKEN is set in the environment, so it is still used; "
                       "unset HF_TOKEN to log out completely.") from error
