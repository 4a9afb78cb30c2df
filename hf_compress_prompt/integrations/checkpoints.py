"""Saving and loading compressed checkpoints: atomic ``save_pretrained`` and a ``from_pretrained`` that also opens
GPTQ checkpoints (``quant_method: "gptq"``) without GPTQModel, and the ``save_pretrained`` of a model with a
recovery prompt attached (it writes the prompt beside the weights).

Which folders a save may replace, and how it replaces them in one step: :mod:`hf_compress_prompt.formats.saved_folder`
(:func:`check_save_target` and :func:`atomic_directory`, importable from here too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .._logging import get_logger
from ..errors import MissingResourceError, UserInputError
from ..formats.saved_folder import PROMPT_SUBFOLDER, atomic_directory, check_save_target
from ..recovery import io as prompt_io
from ..recovery.runtime import attach_saved_prompt, original_method, recovery_prompt_of, register_prompt_method
from ..formats.compressed_tensors import CT_QUANT_METHOD, SPARSITY_KEY
from .transformers_quantizer import QUANT_METHOD, CompressedConfig

__all__ = ["atomic_directory", "check_save_target", "from_pretrained", "save_pretrained"]

logger = get_logger(__name__)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, tokenizer=None, *, overwrite: bool = False,
                    extra_files: dict[str, str] | None = None, **kwargs) -> Path:
    """``model.save_pretrained`` (safetensors only), the tokenizer, ``extra_files`` (name -> text) (and, through
    ``model.save_pretrained``, an attached recovery prompt in ``recovery_prompt/``), written atomically
    (:func:`atomic_directory`: an interrupted save leaves the previous folder loadable as it was).

    Args:
        overwrite (`bool`, *optional*, defaults to `False`): replace a model already saved at ``save_directory``.
            Unlike transformers' ``save_pretrained``, which writes its files into an existing folder, the new folder
            replaces the old one whole, so the default refuses; a folder holding a file no ``save_pretrained``
            writes (or a path that is a file) is refused either way (:func:`check_save_target`). An ``extra_files``
            name outside the usual ones makes the folder one a later save refuses to replace.
        **kwargs: passed to ``model.save_pretrained``.
    """
    kwargs.pop("safe_serialization", None)
    with atomic_directory(save_directory, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(save_directory).expanduser().resolve()



@register_prompt_method("save_pretrained")
def _save_with_prompt(model: nn.Module, save_directory, *args, overwrite: bool = True, **kwargs):
    """``save_pretrained`` of a model with a recovery prompt attached: it also writes the prompt into
    ``recovery_prompt/``. The model and the prompt go into one new folder that then replaces ``save_directory`` in
    one step (:func:`atomic_directory`), so an interrupted save leaves the previous folder loadable with its prompt,
    never a folder that loads without one. As transformers' own does, it replaces an earlier save at that path
    (``overwrite=False`` refuses to); a path that is a file, or a folder holding a file no ``save_pretrained``
    writes, is refused rather than emptied."""
    original = original_method(model, "save_pretrained")
    if not kwargs.get("is_main_process", args[0] if args else True):  # the main process writes the folder
        return original(save_directory, *args, **kwargs)
    if kwargs.get("push_to_hub"):
        raise UserInputError("save_pretrained(push_to_hub=True) would upload this model without its recovery prompt; "
                             "save it, then call model.push_to_hub(repo_id), which uploads both")
    with atomic_directory(save_directory, overwrite=overwrite) as folder:
        out = original(folder, *args, **kwargs)
        prompt_io.write_recovery_prompt(recovery_prompt_of(model), folder / PROMPT_SUBFOLDER, model)
    return out


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingResourceError(f"{path} has no config.json; pass a saved model folder")
    return json.loads(config_file.read_text())


def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, *, model_class=None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` for compressed checkpoints, including GPTQ and compressed-tensors ones.

    A folder saved by this package loads as well with plain ``AutoModelForCausalLM.from_pretrained`` once
    ``hf_compress_prompt`` is imported; this function additionally routes GPTQ checkpoints
    (``quant_method: "gptq"``) to this package's CPU-capable runtime modules instead of GPTQModel, compressed-tensors
    ``pack-quantized`` checkpoints (llm-compressor's W4A16 / W8A16, or :func:`hf_compress_prompt.export`) to them
    without decompressing (transformers' own handler decompresses to full precision; a scheme this package does not
    run is refused in one line pointing there), and attaches a saved recovery prompt (``recovery_prompt/``) to every
    model, also one without packed layers (e.g. only layers dropped).
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
        elif quant.get("quant_method") == CT_QUANT_METHOD and "config" not in kwargs:
            config = AutoConfig.from_pretrained(path)
            sparsity = getattr(config, SPARSITY_KEY, None)
            config.quantization_config = CompressedConfig.from_compressed_tensors(quant, sparsity).to_dict()
            kwargs["config"] = config
            logger.info("loading compressed-tensors checkpoint %s into hf_compress_prompt modules (no decompression)",
                        path)
        elif quant and quant.get("quant_method") not in (None, QUANT_METHOD):
            logger.info("%s uses quant_method %r; loading it with transformers as is", path, quant.get("quant_method"))
    model = model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
    return attach_saved_prompt(model, path)
