"""Orchestration: calibration, the layer-by-layer loop, recipes, and the Optimum-style compressor classes.

The maths lives in ``hf_compress_prompt.methods``; this package feeds it activations and writes results back.
"""

from ..formats.schema import RECIPE_CONFIG_KEY
from .api import (
    Compressor,
    GPTQQuantizer,
    LayerDropper,
    MagnitudePruner,
    RTNQuantizer,
    SparseGPTPruner,
    WandaPruner,
)
from .blocks import find_decoder_layers, find_linear_layers
from .compress import block_linears, compress_, record_pruned, record_quantized, register_compressor
from .configs import (
    CalibrationConfig,
    CompressionConfig,
    GPTQConfig,
    LayerDropConfig,
    MagnitudeConfig,
    Recipe,
    RTNConfig,
    SparseGPTConfig,
    WandaConfig,
    step_from_dict,
)
from .layer_drop import choose_layers_to_drop, drop_layers, score_layers
from .presets import get_preset, list_presets, register_preset
from .state import CompressionResult

__all__ = [
    "RECIPE_CONFIG_KEY",
    "CalibrationConfig",
    "CompressionConfig",
    "CompressionResult",
    "Compressor",
    "GPTQConfig",
    "GPTQQuantizer",
    "LayerDropConfig",
    "LayerDropper",
    "MagnitudeConfig",
    "MagnitudePruner",
    "RTNConfig",
    "RTNQuantizer",
    "Recipe",
    "SparseGPTConfig",
    "SparseGPTPruner",
    "WandaConfig",
    "WandaPruner",
    "block_linears",
    "choose_layers_to_drop",
    "compress_",
    "drop_layers",
    "find_decoder_layers",
    "find_linear_layers",
    "get_preset",
    "list_presets",
    "record_pruned",
    "record_quantized",
    "register_compressor",
    "register_preset",
    "score_layers",
    "step_from_dict",
]
