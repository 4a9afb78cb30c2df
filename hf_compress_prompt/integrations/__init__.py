"""Integrations with the Hugging Face stack: the transformers quantization method (registered on import)."""

from .transformers_quantizer import (
    QUANT_METHOD,
    CompressedConfig,
    CompressedHfQuantizer,
    attach_quantization_config,
    register,
)

register()

__all__ = ["QUANT_METHOD", "CompressedConfig", "CompressedHfQuantizer", "attach_quantization_config", "register"]
