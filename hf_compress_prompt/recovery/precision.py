"""Frozen weights held in the autocast dtype while a recovery trains: the same numbers, without the casts.

Under bf16 autocast every ``nn.Linear`` casts its fp32 weight to bf16 on every forward pass; autocast caches the
cast only for weights that require a gradient, so a frozen model (prompt tuning, LoRA's base layers) pays one copy
per linear and step: 211 copies of 134 M values on SmolLM2, each an operator that waits for both threads on a
shared CPU. Holding a bf16 copy of each frozen linear weight for the length of training gives the linears exactly
the operands autocast would have made (the same round-to-nearest cast, done once), so the step computes the same
numbers. The fp32 weights are kept and put back on exit: the model is left as it was (a head tied to the input
embedding gets its own bf16 copy while training and its tie back afterwards; the embedding itself stays fp32, so the
residual stream keeps its precision).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["frozen_linear_weights_as"]


@contextlib.contextmanager
def frozen_linear_weights_as(model: nn.Module, dtype: torch.dtype | None):
    """Inside, every ``nn.Linear`` of ``model`` whose weight is frozen (``requires_grad`` false) and floating point
    of another dtype holds a ``dtype`` copy of it (its bias too); the original parameters are put back on exit.
    ``dtype`` `None` changes nothing. Only for code that runs the model under autocast to ``dtype``: outside autocast
    a ``dtype`` weight meets fp32 inputs and the matmul refuses the mix. Yields the number of weights cast.

    Args:
        model (`nn.Module`): the model being trained (a PEFT model, or the model itself).
        dtype (`torch.dtype` or `None`): the autocast dtype (``torch.bfloat16`` on CPU).
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        if dtype is not None:
            for module in model.modules():
                if type(module) is not nn.Linear:  # subclasses (LoRA's wrappers, quantized layers) keep their own
                    continue
                for name in ("weight", "bias"):
                    p = getattr(module, name)
                    if p is None or p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
                        continue
                    swapped.append((module, name, p))
                    setattr(module, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))
        yield sum(name == "weight" for _, name, _ in swapped)
    finally:
        for module, name, p in reversed(swapped):
            setattr(module, name, p)
