"""Every keyboard shortcut of the desktop app, in one table: the Help menu lists it, docs/gui.md mirrors it."""

from __future__ import annotations

SHORTCUTS: tuple[tuple[str, str, str], ...] = (
    ("Anywhere", "Ctrl+1 … Ctrl+7", "Library, Discover, Quantize, Compare, Evaluate, Serve, Settings"),
    ("Anywhere", "Ctrl+,", "Settings"),
    ("Anywhere", "Ctrl+Q", "Quit (running jobs are cancelled, nothing is left half-written)"),
    ("Anywhere", "F1", "This list"),
    ("Anywhere", "Alt + underlined letter", "The button with that letter"),
    ("Library", "Ctrl+O", "Import models"),
    ("Library", "Delete", "Delete the selected models"),
    ("Library", "F2", "Rename the selected model (its group)"),
    ("Library", "F5", "Refresh"),
    ("Library", "Esc", "Cancel the import"),
    ("Discover", "Ctrl+F", "Search box"),
    ("Quantize", "Ctrl+Enter", "Quantize"),
    ("Compare", "Enter / Shift+Enter", "Send the prompt / a new line"),
    ("Compare", "Esc", "Stop every answer"),
    ("Compare", "Ctrl+N", "New conversation"),
    ("Evaluate", "Esc", "Cancel the evaluation"),
)
"""(where, keys, what they do)."""
