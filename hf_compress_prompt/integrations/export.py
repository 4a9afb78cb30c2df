"""``export``: a compressed model written in another library's format, for tools that do not import this package."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..errors import UserInputError
from .compressed_tensors import export_compressed_tensors

__all__ = ["EXPORT_FORMATS", "export"]

EXPORT_FORMATS = {"compressed-tensors": export_compressed_tensors}


def export(model: nn.Module, save_directory: str | os.PathLike, format: str = "compressed-tensors", *, tokenizer=None,
           overwrite: bool = False, **kwargs) -> Path:
    """Writes ``model`` in ``format`` so that tools without this package load it.

    Args:
        model (`PreTrainedModel`): a model compressed by this package (or loaded from a folder it saved).
        save_directory (`str` or `os.PathLike`): the folder to create (an existing model folder only with
            ``overwrite=True``; it is replaced whole, atomically, and a folder holding other files is refused).
        format (`str`, defaults to ``"compressed-tensors"``): ``"compressed-tensors"`` (``pack-quantized``, loaded by
            stock transformers with the ``compressed-tensors`` package and served by vLLM; the recovery prompt goes
            along in ``recovery_prompt/``, PEFT format). Saving in this package's own format is ``save_pretrained``.
        tokenizer (*optional*): saved beside the weights.
        **kwargs: passed to the format's writer (:func:`~.compressed_tensors.export_compressed_tensors`).

    Returns:
        `Path`: the folder written.
    """
    writer = EXPORT_FORMATS.get(format)
    if writer is None:
        raise UserInputError(f"export format {format!r} is not one of {sorted(EXPORT_FORMATS)}; this package's own "
                             "format is written by save_pretrained")
    return writer(model, save_directory, tokenizer, overwrite=overwrite, **kwargs)
