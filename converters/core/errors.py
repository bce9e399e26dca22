"""User-facing errors: each message is one sentence saying what is wrong and what to do.

`UserError` and `Cancelled` come from `native.errors`, the lowest layer, so llama.cpp's errors
(`native.errors.NativeError`) are user-facing errors too.
"""

from __future__ import annotations

from native.errors import Cancelled, UserError

__all__ = ["Cancelled", "CheckpointError", "GGUFFileError", "ImatrixError", "OutputError", "TokenizerError",
           "UnsupportedModelError", "UserError", "WorkerDied"]


class CheckpointError(UserError):
    """The checkpoint folder is missing something or holds something unreadable."""


class UnsupportedModelError(UserError):
    """The model's architecture or format is not one qdesk can convert."""


class TokenizerError(UserError):
    """The tokenizer files cannot be read or exported to GGUF."""


class GGUFFileError(UserError):
    """A file is not a GGUF file, or is a damaged one."""


class ImatrixError(UserError):
    """An importance-matrix file is unreadable, damaged, or made for another model."""


class OutputError(UserError):
    """The output cannot be written (permissions, missing folder, full disk)."""


class WorkerDied(UserError):
    """A child process running a step ended without an answer (llama.cpp aborted or crashed, the system ran out of
    memory) or made no progress for too long; the message says which."""
