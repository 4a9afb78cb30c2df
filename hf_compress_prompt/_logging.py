"""The package logger: ``hf_compress_prompt`` and its children.

Like transformers' library logger, warnings (and errors) go to stderr as one line each (``hf_compress_prompt:
message``) unless the application configures logging itself; ``set_verbosity(logging.INFO)`` (the CLI's ``-v``)
shows progress details too. The records do not propagate to the root logger, so an application's own handlers do
not print them twice; attach a handler to ``logging.getLogger("hf_compress_prompt")`` to route them elsewhere.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["get_logger", "set_verbosity"]

_ROOT = "hf_compress_prompt"


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (so a redirected or captured stderr receives the lines)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always answers sys.stderr
        pass


def _configure_root() -> logging.Logger:
    root = logging.getLogger(_ROOT)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(f"{_ROOT}: %(message)s"))
        root.addHandler(handler)
    if root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    root.propagate = False
    return root


_configure_root()


def get_logger(name: str) -> logging.Logger:
    """Returns the logger for module ``name`` (pass ``__name__``) under the package's root logger."""
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def set_verbosity(level: int) -> None:
    """Sets the level of the package's messages on stderr (``logging.WARNING`` by default)."""
    logging.getLogger(_ROOT).setLevel(level)
