"""Which hard-concrete gates stay (Compresso, CoFi): one threshold on every gate's probability of being open, the
lowest one whose model fits a parameter budget, and the differentiable parameter count the sparsity constraint
pulls towards that budget. Functions of gate probabilities and layer sizes; the gates themselves are in
:mod:`.hard_concrete`, the hooks and the pruning in ``compressors/compresso.py``.

Layer sizes are ``(query heads, key/value heads, FFN channels)`` per decoder layer. A query head is charged its
query and output rows plus its share of its group's key/value rows, an FFN channel its gate, up and down rows, a
hidden dimension its rows in every projection and in the embedding (and the output head when it is not tied);
norms are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .structure_scores import keep_heads_per_group, keep_top

__all__ = ["expected_parameters", "lowest_threshold", "open_at", "open_heads_at", "zero_except"]


def open_at(p: torch.Tensor, tau: float, multiple_of: int = 1) -> list[int]:
    """The gates with ``P(open) >= tau`` (``p``: `(gates,)`), their count rounded to a multiple of ``multiple_of``
    unless all stay (the most probably open ones), as sorted indices."""
    count = int((p >= tau).sum())
    if multiple_of > 1 and count < p.numel():
        count = multiple_of * round(count / multiple_of)
    return keep_top(p, count)


def open_heads_at(p: torch.Tensor, num_key_value_heads: int, tau: float) -> list[int]:
    """The query heads kept at threshold ``tau`` (``p``: `(heads,)`): ``round(open heads / key-value heads)`` in
    every key/value group (attention needs the same count per group), the most probably open ones."""
    size = p.numel() // num_key_value_heads  # query heads per group
    per_group = min(size, round(int((p >= tau).sum()) / num_key_value_heads))
    return keep_heads_per_group(p, num_key_value_heads, per_group)


def lowest_threshold(parameters_at: Callable[[float], float], budget: float, iterations: int = 40) -> float:
    """The lowest threshold ``tau`` in [0, 1] whose model has at most ``budget`` parameters, by bisection;
    ``parameters_at(tau)`` must not rise with ``tau`` (a higher threshold keeps fewer gates). Above 1 no gate stays,
    so the search always ends on a threshold that fits."""
    lo, hi = 0.0, 1.0 + 1e-6
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if parameters_at(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return hi


def expected_parameters(width, heads: Sequence, channels: Sequence, sizes: Sequence[tuple[int, int, int]], *,
                        head_dim: int, vocab_size: int, tied: bool):
    """Parameters of the model with ``width`` hidden dimensions, ``heads[l]`` query heads and ``channels[l]`` FFN
    channels in layer ``l`` (numbers or 0-dim tensors: expected counts ``sum P(open)`` keep the result
    differentiable). ``sizes`` are the full layers' ``(heads, key/value heads, channels)``."""
    total = vocab_size * width * (1 if tied else 2)  # embedding (and the output head)
    for (h, kv, _), layer_heads, layer_channels in zip(sizes, heads, channels):
        per_head = 2 * head_dim * width * (1 + kv / h) if h else 0.0  # q and o rows, the head's share of k and v
        total = total + per_head * layer_heads + 3 * width * layer_channels  # gate, up, down
    return total


def zero_except(values: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """``values`` (`(gates,)`) with every entry not in ``kept`` set to 0."""
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask[kept] = True
    return torch.where(mask, values, torch.zeros_like(values))
