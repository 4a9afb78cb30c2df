"""Round-to-nearest (RTN) weight quantization: every weight to the nearest point of its group's grid."""

from __future__ import annotations

import torch

from .quant_grid import QuantizedWeight, check_group_size, grid_params, quantize_codes

__all__ = ["rtn_quantize"]


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = -1, symmetric: bool = False) -> QuantizedWeight:
    """Quantizes ``weight`` (shape `(out_features, in_features)`) group by group along the input dimension.

    Args:
        weight (`torch.Tensor`): the layer's weight.
        bits (`int`, *optional*, defaults to 4): 2, 3, 4 or 8.
        group_size (`int`, *optional*, defaults to -1): input columns per group; -1 for one group per output row.
        symmetric (`bool`, *optional*, defaults to `False`): symmetric grid (zero point fixed at the middle).
    """
    rows, cols = weight.shape
    size = check_group_size(group_size, cols)
    w = weight.float().reshape(rows, cols // size, size)  # (rows, groups, size)
    scale, zero = grid_params(w.reshape(-1, size), bits, symmetric)
    scale, zero = scale.view(rows, -1), zero.view(rows, -1)  # (rows, groups)
    codes = quantize_codes(w, scale[..., None], zero[..., None], bits).reshape(rows, cols)
    return QuantizedWeight(codes.to(torch.uint8), scale, zero, bits, group_size, symmetric)
