"""Compression maths: functions from tensors to tensors, with no hooks, I/O or model knowledge.

The orchestration that feeds them calibration activations layer by layer lives in ``compressors/``.
"""

from .gptq import gptq_quantize
from .hessian import HessianAccumulator, inverse_cholesky_upper
from .layer_scores import LAYER_SCORES, angular_distance, block_influence
from .magnitude import magnitude_prune
from .masks import SparsityPattern, layer_prune_mask, nm_prune_mask, parse_sparsity, row_prune_mask
from .quant_grid import SUPPORTED_BITS, QuantizedWeight, check_group_size, dequantize_codes, grid_params, quantize_codes
from .rtn import rtn_quantize
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_prune, wanda_scores

__all__ = [
    "LAYER_SCORES",
    "SUPPORTED_BITS",
    "HessianAccumulator",
    "QuantizedWeight",
    "SparsityPattern",
    "angular_distance",
    "block_influence",
    "check_group_size",
    "dequantize_codes",
    "gptq_quantize",
    "grid_params",
    "inverse_cholesky_upper",
    "layer_prune_mask",
    "magnitude_prune",
    "nm_prune_mask",
    "parse_sparsity",
    "quantize_codes",
    "row_prune_mask",
    "rtn_quantize",
    "sparsegpt_prune",
    "wanda_prune",
    "wanda_scores",
]
