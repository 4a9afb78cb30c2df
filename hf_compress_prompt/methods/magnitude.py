"""Magnitude pruning: remove the smallest ``|W|`` (the baseline every pruning paper compares against)."""

from __future__ import annotations

import torch

from .masks import SparsityPattern, layer_prune_mask, nm_prune_mask, parse_sparsity

__all__ = ["magnitude_prune"]


def magnitude_prune(weight: torch.Tensor, sparsity: float | str | SparsityPattern = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Prunes ``weight`` (shape `(out_features, in_features)`) by magnitude.

    Unstructured sparsity compares all weights of the layer (as SparseGPT's and Wanda's magnitude baselines do);
    N:M compares within each run of M consecutive input weights.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the pruned weight (same dtype) and the mask (True = pruned).
    """
    pattern = parse_sparsity(sparsity)
    pattern.check_width(weight.shape[1])
    scores = weight.detach().float().abs()
    mask = nm_prune_mask(scores, pattern.n, pattern.m) if pattern.is_nm else layer_prune_mask(scores, pattern.fraction)
    return weight.masked_fill(mask, 0), mask
