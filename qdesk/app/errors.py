"""The application's error hierarchy; the converter's errors are part of it."""

from converters.core.errors import (
    Cancelled,
    CheckpointError,
    GGUFFileError,
    OutputError,
    TokenizerError,
    UnsupportedModelError,
    UserError,
)


class NotYetAvailable(UserError):
    """A command of the contract that this version does not implement yet."""


__all__ = [
    "Cancelled",
    "CheckpointError",
    "GGUFFileError",
    "NotYetAvailable",
    "OutputError",
    "TokenizerError",
    "UnsupportedModelError",
    "UserError",
]
