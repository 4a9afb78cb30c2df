"""Errors for bad input.

Every error raised for something the user chose (a dataset name, a path, a model) is one of these, and its
message is one line that names the value, what was allowed and the fix. The CLI prints that line and exits
with status 2 instead of a traceback.
"""

from __future__ import annotations

__all__ = ["UserInputError", "MissingResourceError"]


class UserInputError(ValueError):
    """A value chosen by the user cannot be used; the message says which value and how to fix it."""


class MissingResourceError(UserInputError, FileNotFoundError):
    """A file, package or dataset that the request needs is not on this machine (and cannot be fetched)."""
