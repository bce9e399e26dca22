"""The Hub's errors as one sentence each: what is wrong and what to do. No message ever holds the user's token."""

from __future__ import annotations

from collections.abc import Iterable

from converters.core.errors import Cancelled, UserError

__all__ = [
    "ChecksumError",
    "DownloadCancelled",
    "HubAccessError",
    "HubConnectionError",
    "HubError",
    "HubNotFoundError",
    "HubOfflineError",
    "HubUnreachableError",
    "UnsafeFileNameError",
    "hub_error",
    "no_file_matches",
    "unreachable",
]


class HubError(UserError):
    """Something between qdesk and the Hugging Face Hub went wrong."""


class HubOfflineError(HubError):
    """Offline mode (HF_HUB_OFFLINE) is on and what was asked needs the Hub."""


class HubUnreachableError(HubError):
    """The Hub cannot be reached at all: no network, a firewall, or the server is down."""


class HubConnectionError(HubError):
    """The connection was lost during a transfer and the retries ran out; the download can be resumed."""


class HubAccessError(HubError):
    """The repository is gated or private and the token (if any) does not open it."""


class HubNotFoundError(HubError):
    """No such repository, revision or file."""


class ChecksumError(HubError):
    """A downloaded file does not match the checksum the Hub published for it; it was not kept."""


class UnsafeFileNameError(HubError):
    """A repository lists a file name that would escape the cache folder."""


class DownloadCancelled(Cancelled):
    """The user paused or cancelled a download; `kept_bytes` of partial data stay in the cache for resuming."""

    def __init__(self, message: str, kept_bytes: int = 0) -> None:
        super().__init__(message)
        self.kept_bytes = kept_bytes


OFFLINE_MODE = ("Offline mode is on (HF_HUB_OFFLINE is set), so qdesk does not contact the Hugging Face Hub; "
                "unset HF_HUB_OFFLINE to search or download.")


def no_file_matches(repo_id: str, patterns: Iterable[str], *, in_cache: bool = False) -> str:
    """The start of the sentence for `--include` globs that matched no file (a clause: the caller ends it)."""
    listed = ", ".join(repr(pattern) for pattern in patterns)
    where = " in the cache" if in_cache else ""
    return (f"No file of {repo_id}{where} matches {listed} (the patterns match paths inside the repository, such as "
            "'*Q4_K_M*' or 'config.json')")


def unreachable(endpoint: str) -> str:
    return (f"The Hugging Face Hub at {endpoint} cannot be reached (no network, or the server is down); check the "
            "connection and try again.")


def _access_advice(repo_id: str, endpoint: str, has_token: bool) -> str:
    login = ("and check that the token you logged in with (`hf auth login`, or HF_TOKEN) may read it" if has_token
             else "and log in with `hf auth login` (or set HF_TOKEN)")
    return (f"{repo_id} is gated or private: accept its licence on its page ({endpoint}/{repo_id}) {login}, then "
            "try again.")


def hub_error(error: BaseException, *, repo_id: str | None, endpoint: str, has_token: bool,
              revision: str | None = None, path: str | None = None) -> HubError | None:
    """The HubError for an exception raised by huggingface_hub or httpx2, or None for anything else."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = repo_id or "the Hub"
    if isinstance(error, LocalEntryNotFoundError):  # huggingface_hub found neither the server nor a cached copy
        cause = error.__cause__
        if cause is not None and cause is not error:
            translation = hub_error(cause, repo_id=repo_id, endpoint=endpoint, has_token=has_token,
                                    revision=revision, path=path)
            if translation is not None:
                return translation
        return HubUnreachableError(unreachable(endpoint))
    if isinstance(error, OfflineModeIsEnabled):
        return HubOfflineError(OFFLINE_MODE)
    if isinstance(error, httpx2.TransportError):
        return HubUnreachableError(unreachable(endpoint))
    if not isinstance(error, HfHubHTTPError):
        return None
    status = error.response.status_code if error.response is not None else 0
    if isinstance(error, GatedRepoError) or (status in (401, 403) and not isinstance(error, RepositoryNotFoundError)):
        return HubAccessError(_access_advice(what, endpoint, has_token))
    if isinstance(error, RepositoryNotFoundError):
        if status in (401, 403):
            return HubAccessError(f"{what} was not found on the Hub, or it is gated or private: check its name; if it "
                                  f"exists, accept its licence on its page ({endpoint}/{what}) and log in with "
                                  "`hf auth login` (or set HF_TOKEN).")
        return HubNotFoundError(f"There is no repository {what} on the Hub; check its name (owner/name).")
    if isinstance(error, RevisionNotFoundError):
        return HubNotFoundError(f"{what} has no revision {revision!r}; check the branch, tag or commit name.")
    if isinstance(error, RemoteEntryNotFoundError):
        return HubNotFoundError(f"{what} has no file {path!r} at revision {revision or 'main'}; see its files with "
                                f"`qdesk download {what} --list`.")
    if status == 429:
        return HubError("The Hub is limiting the rate of requests from this machine; wait a few minutes and try again.")
    if status >= 500:
        return HubUnreachableError(f"The Hugging Face Hub answered with a server error (HTTP {status}); try again "
                                   "later.")
    return HubError(f"The Hub refused the request for {what} (HTTP {status}); check the repository name and "
                    "revision.")
