"""Pure-PyTorch reference implementations of the compressed-linear ops: decode the stored tensors to the dense
weight, then one matmul. They are the fallback on every device and the oracle the fast kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import LinearFormat, unpack_linear

__all__ = ["dense_weight", "reference_linear"]


def dense_weight(fmt: LinearFormat, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The layer's dense weight `(out, in)` in ``dtype``."""
    return unpack_linear(fmt, tensors, dtype=torch.float32).to(dtype)


def reference_linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
    """``x @ W.T + bias`` with ``W`` decoded from ``tensors``; ``x`` of shape `(..., in)`."""
    weight = dense_weight(fmt, tensors, x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
