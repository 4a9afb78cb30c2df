"""Sparsity patterns and the masks that realise them from a score (lower score = pruned first)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserInputError

__all__ = ["SparsityPattern", "parse_sparsity", "nm_prune_mask", "row_prune_mask", "layer_prune_mask"]


@dataclass(frozen=True)
class SparsityPattern:
    """Either unstructured (``fraction`` of weights pruned) or N:M (at most ``n`` weights kept in each run of
    ``m`` consecutive input weights, NVIDIA's convention: 2:4 keeps 2 of every 4)."""

    fraction: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.fraction:g}"

    def check_width(self, in_features: int) -> None:
        if self.is_nm and in_features % self.m:
            raise UserInputError(
                f"{self} sparsity needs in_features divisible by {self.m}, but in_features={in_features}; "
                "use unstructured sparsity for this layer or skip it"
            )


def parse_sparsity(value: float | str | SparsityPattern) -> SparsityPattern:
    """``0.5`` or ``"0.5"`` -> unstructured 50%; ``"2:4"`` -> N:M. Fractions must lie in (0, 1); N:M needs 0 < n < m."""
    if isinstance(value, SparsityPattern):
        return value
    if isinstance(value, str) and ":" in value:
        try:
            n, m = (int(part) for part in value.split(":"))
        except ValueError:
            raise UserInputError(f"sparsity={value!r} is not of the form N:M; use e.g. '2:4' or '4:8'") from None
        if not 0 < n < m:
            raise UserInputError(f"sparsity={value!r} needs 0 < N < M; use e.g. '2:4' or '4:8'")
        return SparsityPattern(fraction=1 - n / m, n=n, m=m)
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"sparsity={value!r} is neither a fraction nor N:M; use e.g. 0.5 or '2:4'") from None
    if not 0 < fraction < 1:
        raise UserInputError(f"sparsity={value!r} is outside (0, 1); use a fraction such as 0.5, or N:M such as '2:4'")
    return SparsityPattern(fraction=fraction)


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
