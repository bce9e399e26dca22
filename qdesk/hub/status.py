"""Whether the Hub can be used now, asked before the user searches: offline mode, no network, or reachable.

`hub_status()` makes no request in offline mode and one small one otherwise (the first model of a listing, with a
short timeout), so a window can say on opening that search and download will not work, and what to do instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from qdesk.hub.errors import OFFLINE_MODE, HubError, HubOfflineError, HubUnreachableError, unreachable
from qdesk.hub.http import check_online, library_requests, translated
from qdesk.hub.settings import HubSettings

__all__ = ["PROBE_TIMEOUT_S", "HubStatus", "hub_status"]

PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class HubStatus:
    online: bool
    offline_mode: bool
    """HF_HUB_OFFLINE is set: no request was made."""
    sentence: str
    """"" when online; else what is wrong and what to do, in one sentence."""
    endpoint: str


def hub_status(settings: HubSettings | None = None) -> HubStatus:
    """Can the Hub at `settings.endpoint` be searched now?"""
    settings = settings or HubSettings.from_environment(timeout_s=PROBE_TIMEOUT_S)
    try:
        check_online(settings)
        with translated(settings, None), library_requests(settings):
            next(iter(settings.api().list_models(limit=1)), None)
    except HubOfflineError:
        return HubStatus(False, True, OFFLINE_MODE, settings.endpoint)
    except HubUnreachableError as error:
        return HubStatus(False, False, str(error), settings.endpoint)
    except HubError as error:  # the server answered, if not well: searching will say more
        return HubStatus(True, False, str(error), settings.endpoint)
    except OSError:
        return HubStatus(False, False, unreachable(settings.endpoint), settings.endpoint)
    return HubStatus(True, False, "", settings.endpoint)
