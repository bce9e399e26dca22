"""User-facing errors: each message is one sentence saying what is wrong and what to do."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, reported as one plain sentence."""


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


class Cancelled(Exception):
    """The user cancelled the operation; nothing was left behind."""
