"""Optimum-style front doors: ``GPTQQuantizer(bits=4, group_size=64).quantize_model(model, tokenizer)`` and friends.

Each wraps one recipe step plus its calibration settings and calls :func:`compress_`, which packs the compressed
layers (:mod:`hf_compress_prompt.nn`); ``save`` writes them in the packed safetensors format with the
``quantization_config`` and recipe in ``config.json``, atomically. Layer-dropped models are plain, smaller
checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

from optimum.quantization_base import OptimumQuantizer
from torch import nn

from ..errors import UserInputError
from ..integrations.checkpoints import save_pretrained
from ..models import load_model_and_tokenizer
from .compress import CompressionResult, compress_
from .configs import (
    CalibrationConfig,
    CompressionConfig,
    GPTQConfig,
    LayerDropConfig,
    MagnitudeConfig,
    RTNConfig,
    SparseGPTConfig,
    WandaConfig,
)

__all__ = [
    "Compressor",
    "RTNQuantizer",
    "GPTQQuantizer",
    "SparseGPTPruner",
    "WandaPruner",
    "MagnitudePruner",
    "LayerDropper",
]

_CALIBRATION_KEYS = ("dataset", "split", "nsamples", "seqlen", "seed", "batch_size")


class Compressor(OptimumQuantizer):
    """A recipe step and its calibration data.

    Two ways in, as in optimum: ``compressor.compress_model(model, tokenizer)`` (alias ``quantize_model`` /
    ``prune_model``, like ``optimum.gptq.GPTQQuantizer``) on a model you hold, then :meth:`save`; or
    ``Cls.from_pretrained(model_or_path, **settings).quantize(save_dir)`` (``OptimumQuantizer``'s interface), which
    loads, compresses and saves. ``self.result`` holds the last :class:`CompressionResult`.
    """

    config_class: type[CompressionConfig] = CompressionConfig

    def __init__(self, **kwargs):
        calibration = {k: kwargs.pop(k) for k in _CALIBRATION_KEYS if k in kwargs}
        self.calibration = CalibrationConfig(**calibration)
        self.config = self.config_class(**kwargs)
        self.result: CompressionResult | None = None
        self.model: nn.Module | None = None
        self.tokenizer = None

    @classmethod
    def from_pretrained(cls, model_or_path: str | os.PathLike | None = None, file_name: str | None = None, **kwargs):
        """Loads ``model_or_path`` (``None`` for the embedded SmolLM2; ``file_name`` a ``.gguf`` inside a folder)
        and returns a compressor built from ``kwargs`` and bound to it."""

        compressor = cls(**kwargs)
        source = Path(model_or_path) / file_name if file_name is not None else model_or_path
        compressor.model, compressor.tokenizer = load_model_and_tokenizer(source)
        return compressor

    def quantize(self, save_dir: str | os.PathLike, file_prefix: str | None = None, **kwargs) -> Path:
        """Compresses the model bound by :meth:`from_pretrained` and saves it (with its tokenizer) to ``save_dir``."""
        if self.model is None:
            raise UserInputError(
                f"{type(self).__name__} holds no model; use {type(self).__name__}.from_pretrained(...).quantize(dir) "
                "or compress_model(model, tokenizer)"
            )
        if file_prefix is not None:
            raise UserInputError("file_prefix is not supported: checkpoints use the standard transformers file names")
        self.compress_model(self.model, self.tokenizer, **kwargs)
        self.save(self.model, save_dir, tokenizer=self.tokenizer)
        return Path(save_dir)

    def compress_model(self, model: nn.Module, tokenizer=None, *, progress: bool = True) -> nn.Module:
        """Compresses ``model`` in place (calibrating with ``tokenizer`` when the method needs data) and returns it."""
        self.result = compress_(model, self.config, tokenizer=tokenizer, calibration=self.calibration, progress=progress)
        return model

    quantize_model = compress_model
    prune_model = compress_model

    def save(self, model: nn.Module, save_dir: str | os.PathLike, tokenizer=None, **kwargs) -> None:
        """Saves ``model`` (packed safetensors, config and recipe in config.json) and the tokenizer to ``save_dir``,
        atomically (:func:`hf_compress_prompt.save_pretrained`)."""

        save_pretrained(model, save_dir, tokenizer=tokenizer, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, {self.calibration!r})"


class RTNQuantizer(Compressor):
    """Round-to-nearest quantization; see :class:`RTNConfig` for the arguments."""

    config_class = RTNConfig


class GPTQQuantizer(Compressor):
    """GPTQ quantization; arguments of :class:`GPTQConfig` plus calibration (``dataset="c4"``, ``nsamples``,
    ``seqlen``, ``seed``, ``batch_size``)."""

    config_class = GPTQConfig


class SparseGPTPruner(Compressor):
    """SparseGPT pruning (``sparsity=0.5`` or ``"2:4"``; ``bits=4`` for the joint mode); see :class:`SparseGPTConfig`."""

    config_class = SparseGPTConfig


class WandaPruner(Compressor):
    """Wanda pruning; see :class:`WandaConfig`."""

    config_class = WandaConfig


class MagnitudePruner(Compressor):
    """Magnitude pruning; see :class:`MagnitudeConfig`."""

    config_class = MagnitudeConfig


class LayerDropper(Compressor):
    """Layer dropping (``num_layers=``, ``fraction=`` or ``layers=``); see :class:`LayerDropConfig`."""

    config_class = LayerDropConfig
