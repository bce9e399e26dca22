"""The PySide6 desktop app; nothing below qdesk/gui imports Qt."""
