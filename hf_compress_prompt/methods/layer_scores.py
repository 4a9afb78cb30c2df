"""How much a decoder layer changes its hidden states: the scores that choose which layers to drop.

- Block influence (ShortGPT, Men et al. 2024): ``BI = 1 - E_t[cos(h_in_t, h_out_t)]``, in [0, 2].
- Angular distance (Gromov et al. 2024): ``E_t[arccos(cos(h_in_t, h_out_t)) / pi]``, in [0, 1].

A low score means the layer barely turns the residual stream, so removing it should cost little. Both average over
every calibration token (padding excluded by the caller).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["block_influence", "angular_distance", "LAYER_SCORES"]


def _cosine(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per token of hidden states shaped `(..., hidden)`, flattened to `(tokens,)`."""
    return F.cosine_similarity(h_in.reshape(-1, h_in.shape[-1]).float(), h_out.reshape(-1, h_out.shape[-1]).float(), dim=-1)


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """ShortGPT's block influence of a layer with input ``h_in`` and output ``h_out`` (same shape)."""
    return float(1 - _cosine(h_in, h_out).mean())


def angular_distance(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """Mean angle between input and output hidden states, as a fraction of pi."""
    return float(torch.arccos(_cosine(h_in, h_out).clamp(-1, 1)).mean() / math.pi)


LAYER_SCORES = {"block_influence": block_influence, "angular_distance": angular_distance}
