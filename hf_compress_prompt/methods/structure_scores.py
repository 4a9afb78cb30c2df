"""Importance of whole structures (attention heads, FFN channels) from weight magnitudes: the one-shot structured
pruning baseline. Functions from weight tensors to scores; the orchestration is in ``compressors/structured.py``.

A structure's score is the L2 norm of every weight that exists only for it: a head's query rows and output-projection
columns, an FFN channel's gate and up rows and down-projection column. Heads are kept per key/value group, the same
number in every group, so grouped-query attention stays valid.
"""

from __future__ import annotations

import torch

__all__ = ["channel_scores", "head_scores", "keep_heads_per_group", "keep_top"]


def head_scores(q_weight: torch.Tensor, o_weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """L2 norm of each query head's weights: ``q_weight`` `(heads * hd, hidden)`, ``o_weight`` `(hidden, heads * hd)`
    -> `(heads,)`."""
    heads = q_weight.shape[0] // head_dim
    q = q_weight.float().reshape(heads, head_dim, -1).pow(2).sum(dim=(1, 2))  # (heads,)
    o = o_weight.float().reshape(o_weight.shape[0], heads, head_dim).pow(2).sum(dim=(0, 2))  # (heads,)
    return (q + o).sqrt()


def channel_scores(gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each FFN channel's weights: gate and up `(channels, hidden)`, down `(hidden, channels)` ->
    `(channels,)`."""
    rows = gate_weight.float().pow(2).sum(dim=1) + up_weight.float().pow(2).sum(dim=1)  # (channels,)
    return (rows + down_weight.float().pow(2).sum(dim=0)).sqrt()


def keep_top(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` highest scores, in ascending index order (ties: lower index first)."""
    if count <= 0:
        return []
    order = torch.argsort(scores, descending=True, stable=True)[:count]
    return sorted(order.tolist())


def keep_heads_per_group(scores: torch.Tensor, num_key_value_heads: int, per_group: int) -> list[int]:
    """The ``per_group`` best query heads of every key/value group (heads ``g * size ... (g + 1) * size - 1``
    share key/value head ``g``), as sorted indices. ``per_group == 0`` keeps no head."""
    size = scores.numel() // num_key_value_heads
    if not 0 <= per_group <= size:
        raise ValueError(f"per_group={per_group} must lie in [0, {size}] (query heads per key/value group)")
    kept = []
    for g in range(num_key_value_heads):
        kept += [g * size + i for i in keep_top(scores[g * size:(g + 1) * size], per_group)]
    return kept
