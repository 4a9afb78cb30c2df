"""The package logger: ``hf_compress_prompt`` and its children, silent unless the application configures logging."""

from __future__ import annotations

import logging

__all__ = ["get_logger"]

_ROOT = "hf_compress_prompt"
logging.getLogger(_ROOT).addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """Returns the logger for module ``name`` (pass ``__name__``) under the package's root logger."""
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)
