"""The root of qdesk's user-facing errors, and the errors the native bridge raises.

`UserError` and `Cancelled` live here, in the lowest layer, so that every error a person may see belongs to one
family whatever layer raised it: `converters.core.errors` and `qdesk.app.errors` re-export them and derive their
own errors from them, and the CLI and the desktop app show any `UserError` as its one sentence and any
`Cancelled` as a cancellation. The bridge still imports nothing of ours.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, reported as one plain sentence: what is wrong, what to do."""


class Cancelled(Exception):
    """The user cancelled the operation; nothing was left behind."""


class NativeError(UserError):
    """A problem reaching or running llama.cpp's compiled libraries."""


class LibraryMismatch(NativeError):
    """The installed llama-cpp-python is not the build this bridge was written against."""


class QuantizerFailed(NativeError):
    """llama.cpp's quantizer refused the input or stopped part-way."""


class EvaluationFailed(NativeError):
    """llama.cpp could not load a model or evaluate a batch of tokens."""


class Stopped(NativeError, Cancelled):
    """The caller asked a running native operation to stop, and it did."""


class ChildFailed(NativeError):
    """A child process (`native.child`) ended without an answer: llama.cpp aborted or crashed it, or it was killed."""


class ChildStalled(ChildFailed):
    """A child process made no progress for longer than its watchdog allows, and was stopped."""
