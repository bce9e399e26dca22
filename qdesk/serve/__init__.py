"""`qdesk serve`: library variants behind an OpenAI-compatible HTTP API, on the same engine as the app's chat."""

from qdesk.serve.app import RequestRecord
from qdesk.serve.server import RunningServer, ServeError, ServeOptions, start_server

__all__ = ["RequestRecord", "RunningServer", "ServeError", "ServeOptions", "start_server"]
