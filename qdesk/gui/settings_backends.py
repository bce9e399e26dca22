"""What the Settings section says about this machine's compute backends: `qdesk.app.backends_text` (no Qt)."""

from __future__ import annotations

from qdesk.app.backends_text import describe_backends

__all__ = ["describe_backends"]
