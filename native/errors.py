"""Errors raised by the native bridge; each message is one sentence saying what is wrong and what to do.

The bridge sits below the application's error hierarchy (it imports nothing of ours), so the
application treats `NativeError` as a user-facing error of its own.
"""

from __future__ import annotations


class NativeError(Exception):
    """A problem reaching or running llama.cpp's compiled libraries."""


class LibraryMismatch(NativeError):
    """The installed llama-cpp-python is not the build this bridge was written against."""


class QuantizerFailed(NativeError):
    """llama.cpp's quantizer refused the input or stopped part-way."""


class EvaluationFailed(NativeError):
    """llama.cpp could not load a model or evaluate a batch of tokens."""


class Stopped(NativeError):
    """The caller asked a running native operation to stop, and it did."""


class ChildFailed(NativeError):
    """A child process (`native.child`) ended without an answer: llama.cpp aborted or crashed it, or it was killed."""


class ChildStalled(ChildFailed):
    """A child process made no progress for longer than its watchdog allows, and was stopped."""
