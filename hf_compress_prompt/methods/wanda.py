"""Wanda (Sun et al., 2024): prune by ``|W_ij| * ||X_j||``, compared within each output row, no weight update."""

from __future__ import annotations

import torch

from .masks import SparsityPattern, nm_prune_mask, parse_sparsity, row_prune_mask

__all__ = ["wanda_scores", "wanda_prune"]


def wanda_scores(weight: torch.Tensor, channel_sq_norm: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| * ||X_j||_2`` (the norm over calibration tokens; a common 1/sqrt(n) factor does not change the
    ranking). ``channel_sq_norm`` is ``||X_j||^2 / n``, shape `(in_features,)`."""
    return weight.detach().float().abs() * torch.sqrt(channel_sq_norm.float())[None, :]


def wanda_prune(
    weight: torch.Tensor, channel_sq_norm: torch.Tensor, sparsity: float | str | SparsityPattern = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prunes ``weight`` (shape `(out_features, in_features)`) with Wanda.

    Args:
        weight (`torch.Tensor`): the layer's weight.
        channel_sq_norm (`torch.Tensor` of shape `(in_features,)`): mean squared input of each channel over the
            calibration tokens (:attr:`HessianAccumulator.channel_sq_norm`, or accumulated directly).
        sparsity (`float`, `str` or `SparsityPattern`, *optional*, defaults to 0.5): a fraction per output row, or N:M.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the pruned weight (same dtype) and the mask (True = pruned).
    """
    pattern = parse_sparsity(sparsity)
    pattern.check_width(weight.shape[1])
    scores = wanda_scores(weight, channel_sq_norm)
    mask = nm_prune_mask(scores, pattern.n, pattern.m) if pattern.is_nm else row_prune_mask(scores, pattern.fraction)
    return weight.masked_fill(mask, 0), mask
