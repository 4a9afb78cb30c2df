"""Sparsity patterns and the masks that realise them from a score (lower score = pruned first)."""

from __future__ import annotations

import torch

from ..validation import SparsityPattern, parse_sparsity  # the pattern and its parser live with the other checks

__all__ = ["SparsityPattern", "layer_prune_mask", "nm_prune_mask", "parse_sparsity", "row_prune_mask"]


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where pruned: in every run of ``m`` consecutive columns of each row, the ``m - n`` lowest scores."""
    rows, cols = scores.shape
    runs = scores.reshape(rows, cols // m, m)  # (rows, runs, m)
    lowest = torch.topk(runs, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, lowest, True)
    return mask.reshape(rows, cols)


def row_prune_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """True where pruned: the ``int(cols * fraction)`` lowest scores of each row (Wanda's per-output comparison)."""
    k = int(scores.shape[1] * fraction)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def layer_prune_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """True where pruned: the ``int(numel * fraction)`` lowest scores of the whole matrix (layer-wise magnitude)."""
    k = int(scores.numel() * fraction)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask.view_as(scores)
