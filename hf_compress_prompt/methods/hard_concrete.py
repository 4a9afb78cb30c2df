"""Hard-concrete gates and the L0 penalty (Louizos et al. 2018), as CoFi and Compresso use them to learn which
structures to prune.

Each gate ``z`` in [0, 1] has a learnable ``log_alpha``. Training samples
``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, ``u ~ U(0, 1)``, stretches it to ``(l, r) = (-0.1, 1.1)``
and clips to [0, 1], so a gate is exactly 0 or 1 with positive probability and the expected L0 norm
``P(z > 0) = sigmoid(log_alpha - beta * log(-l / r))`` is differentiable. At the end the caller decides which gates
stay (the structured pruner keeps the most probably open ones up to a parameter budget) and folds each kept gate's
mean value ``E[z]`` into the weights: the deterministic value closest to what training saw.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["HardConcreteGate", "lagrangian_penalty"]

BETA = 2 / 3  # temperature (Louizos et al., CoFi)
LIMIT_L, LIMIT_R = -0.1, 1.1  # stretch interval
_EPS = 1e-6


class HardConcreteGate(nn.Module):
    """``size`` hard-concrete gates.

    Args:
        size (`int`): number of gates (heads, channels or hidden dimensions).
        init_keep (`float`, *optional*, defaults to 0.95): initial probability that a sampled gate is non-zero;
            CoFi starts at 0.5 for long runs, short CPU runs need the model nearly intact at the start.
    """

    def __init__(self, size: int, init_keep: float = 0.95):
        super().__init__()
        if not 0 < init_keep < 1:
            raise ValueError(f"init_keep={init_keep} must lie in (0, 1)")
        # choose log_alpha so that P(z > 0) = init_keep
        start = math.log(init_keep / (1 - init_keep)) + BETA * math.log(-LIMIT_L / LIMIT_R)
        self.log_alpha = nn.Parameter(torch.full((size,), start) + 0.01 * torch.randn(size))

    def forward(self) -> torch.Tensor:
        """A sample of the gates in training mode, their mean values in eval mode: `(size,)`."""
        if not self.training:
            return self.mean_values()
        return self._sample(torch.rand_like(self.log_alpha))

    def _sample(self, u: torch.Tensor) -> torch.Tensor:
        u = u.clamp(_EPS, 1 - _EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)  # concrete sample
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0, 1)  # stretched and clipped

    @torch.no_grad()
    def mean_values(self, samples: int = 1024) -> torch.Tensor:
        """``E[z]`` per gate, estimated on ``samples`` fixed quantiles of ``u`` (deterministic): `(size,)`."""
        u = (torch.arange(samples, dtype=self.log_alpha.dtype, device=self.log_alpha.device) + 0.5) / samples
        return self._sample(u[:, None].expand(samples, self.log_alpha.numel())).mean(dim=0)

    def expected_open(self) -> torch.Tensor:
        """``P(z > 0)`` per gate (differentiable): the expected L0 norm is its sum."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))


def lagrangian_penalty(expected: torch.Tensor, target: float, lambda_1: torch.Tensor,
                       lambda_2: torch.Tensor) -> torch.Tensor:
    """CoFi's constraint term ``lambda_1 (s - t) + lambda_2 (s - t)^2`` for expected sparsity ``s`` and target
    ``t``; the model minimises it while the multipliers maximise it (their gradients are negated by the caller)."""
    gap = expected - target
    return lambda_1 * gap + lambda_2 * gap * gap
