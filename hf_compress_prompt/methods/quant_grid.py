"""Uniform integer grids for weight quantization (GPTQ's conventions), per output row and per input group.

A weight ``w`` in a group with ``scale`` s and integer ``zero`` z is stored as the code
``q = clamp(round(w / s) + z, 0, 2**bits - 1)`` and read back as ``s * (q - z)``.

- asymmetric: the group's range ``[min(w.min(), 0), max(w.max(), 0)]`` maps onto ``[0, maxq]``,
  ``s = (max - min) / maxq``, ``z = round(-min / s)``. Zero is always exactly representable.
- symmetric: ``s = 2 * max|w| / maxq`` and ``z = (maxq + 1) / 2`` (as GPTQ and AutoGPTQ do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import SUPPORTED_BITS, check_bits, resolve_group_size, static_group_index

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedWeight",
    "check_group_size",
    "dequantize_codes",
    "grid_params",
    "quantize_codes",
]

@dataclass
class QuantizedWeight:
    """A weight matrix on an integer grid.

    Attributes:
        codes (`torch.Tensor` of shape `(rows, cols)`, uint8): integer codes in ``[0, 2**bits - 1]``.
        scale (`torch.Tensor` of shape `(rows, groups)`): per-group step.
        zero (`torch.Tensor` of shape `(rows, groups)`): per-group integer zero point (stored as float).
        bits (`int`), group_size (`int`, -1 for one group per row), symmetric (`bool`).
        perm (`torch.Tensor`, *optional*): the act-order permutation GPTQ used (columns were visited in this order);
            groups still follow the original column order (static groups), so ``g_idx = arange(cols) // group_size``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    perm: torch.Tensor | None = None

    @property
    def group_index(self) -> torch.Tensor:
        """``g_idx``: the group of each input column, shape `(cols,)`."""
        return static_group_index(self.codes.shape[1], self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The represented weights, shape `(rows, cols)`: ``scale * (codes - zero)`` group by group, with one
        weight-sized temporary (the per-column gather of scales and zeros would add two)."""
        rows, cols = self.codes.shape
        size = cols if self.group_size == -1 else self.group_size
        w = self.codes.reshape(rows, cols // size, size).to(torch.float32, copy=True)  # (rows, groups, size)
        w.sub_(self.zero[..., None]).mul_(self.scale[..., None])  # dequantize_codes' arithmetic, in place
        return w.reshape(rows, cols).to(dtype)


def check_group_size(group_size: int, in_features: int) -> int:
    """Returns the group size to use (``in_features`` for -1); a size that does not divide ``in_features`` is an error
    listing the sizes that do (:func:`hf_compress_prompt.validation.resolve_group_size`)."""
    return resolve_group_size(group_size, in_features)


def _max_code(bits: int) -> int:
    check_bits(bits)
    return 2**bits - 1


def grid_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w`` (shape `(rows, n)`); both returned with shape `(rows,)`."""
    maxq = _max_code(bits)
    w = w.float()
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)  # the range always holds 0
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row: any positive scale works
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` on the grid (``scale``/``zero`` broadcast against ``w``), as float tensors."""
    maxq = 2**bits - 1
    return (w.float() / scale).round_().add_(zero).clamp_(0, maxq)  # clamp(round(w / scale) + zero), one temporary


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (codes - zero)`` in float32."""
    return scale * (codes.float() - zero)
