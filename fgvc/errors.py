"""The one exception type for problems a user can fix.

A :class:`FgvcError` is bad input, a missing file or an unknown name: the command line shows
its message as one line and exits 1. Every other exception is a bug (ours, torch's, CUDA's)
and keeps its traceback. The subclasses also derive from the built-in type a caller would
naturally catch (``ValueError`` for bad values, ``FileNotFoundError`` for missing files).
"""

from __future__ import annotations


class FgvcError(Exception):
    """A problem the user can fix; its message says what is wrong and how to fix it."""


class ConfigError(FgvcError, ValueError):
    """An option has a value the task cannot run with; the message names the option."""


class MissingFileError(FgvcError, FileNotFoundError):
    """A file or folder the task needs is not there; the message names it."""


class UnsafeFileError(FgvcError, ValueError):
    """A file holds more than tensors (pickled code): refused, never executed."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (torch's messages run to dozens)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


class TrackingUnreachable(FgvcError, ConnectionError):
    """The tracking server did not answer within the stated wait; the message says what was
    kept and how to resume."""


class PermissionDenied(FgvcError, PermissionError):
    """The tracking server refused an operation (HTTP 401/403); the message names the
    operation, the resource and the user."""


class WriteFailed(FgvcError, OSError):
    """A file fgvc writes could not be written (a full disk, a read-only folder); the message
    names the path, the space needed when known, and what was kept."""
