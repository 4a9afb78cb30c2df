"""Saving and loading compressed checkpoints: atomic ``save_pretrained`` and a ``from_pretrained`` that also opens
GPTQ checkpoints (``quant_method: "gptq"``) without GPTQModel."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from .._logging import get_logger
from ..errors import MissingResourceError
from .transformers_quantizer import QUANT_METHOD, CompressedConfig

__all__ = ["atomic_directory", "save_pretrained", "from_pretrained"]

logger = get_logger(__name__)


@contextlib.contextmanager
def atomic_directory(save_directory: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside ``save_directory`` to write into, then renames it into place (replacing
    an older folder of that name); on any error the temporary folder is removed and the target left untouched.
    An interrupted save never leaves a folder that loads half-written."""
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, tokenizer=None, *,
                    extra_files: dict[str, str] | None = None, **kwargs) -> Path:
    """``model.save_pretrained`` (safetensors only), the tokenizer, ``extra_files`` (name -> text) (and, through
    ``model.save_pretrained``, an attached recovery prompt in ``recovery_prompt/``), written atomically
    (:func:`atomic_directory`)."""
    kwargs.pop("safe_serialization", None)
    with atomic_directory(save_directory) as tmp:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(save_directory).resolve()


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingResourceError(f"{path} has no config.json; pass a saved model folder")
    return json.loads(config_file.read_text())


def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, *, model_class=None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` for compressed checkpoints, including GPTQ ones.

    A folder saved by this package loads as well with plain ``AutoModelForCausalLM.from_pretrained`` once
    ``hf_compress_prompt`` is imported; this function additionally routes GPTQ checkpoints
    (``quant_method: "gptq"``) to this package's CPU-capable runtime modules instead of GPTQModel, and attaches a
    saved recovery prompt to models without packed layers too (e.g. only layers dropped).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    path = Path(pretrained_model_name_or_path)
    if path.is_dir():
        quant = _read_config(path).get("quantization_config") or {}
        if quant.get("quant_method") == "gptq" and "config" not in kwargs:
            config = AutoConfig.from_pretrained(path)
            config.quantization_config = CompressedConfig.from_gptq(quant).to_dict()
            kwargs["config"] = config
            logger.info("loading GPTQ checkpoint %s into hf_compress_prompt modules", path)
        elif quant and quant.get("quant_method") not in (None, QUANT_METHOD):
            logger.info("%s uses quant_method %r; loading it with transformers as is", path, quant.get("quant_method"))
    model = model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
    from ..recovery.io import attach_saved_prompt

    return attach_saved_prompt(model, path)
