"""The GPTQ checkpoint layout written by AutoGPTQ, GPTQModel and optimum (``quant_method: "gptq"``), read into
(and written from) our integer grid, so the Hub's GPTQ models load into this package's runtime modules on a CPU
without GPTQModel.

Per quantized linear (``in`` inputs, ``out`` outputs, ``G = in / group_size`` groups; source: AutoGPTQ's
``QuantLinear.pack`` in ``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py`` and optimum's ``optimum/gptq``
docs; GPTQModel keeps the same names):

- ``qweight`` int32 `(in * bits / 32, out)`: for each output column, the codes of inputs ``0 .. in-1`` as a
  little-endian bit stream in 32-bit words (3-bit codes straddle word boundaries).
- ``qzeros`` int32 `(G, out * bits / 32)`: for each group, the zero points of outputs ``0 .. out-1`` packed the
  same way. ``checkpoint_format: "gptq"`` (v1, the default) stores ``zero - 1``; ``"gptq_v2"`` stores ``zero``.
- ``scales`` float16 `(G, out)`; ``g_idx`` int32 `(in,)`: the group of each input column (not monotonic when
  ``desc_act`` was used without static groups); ``bias`` float16 `(out,)` when the layer has one.

A weight reads back as ``scales[g_idx[i], o] * (code[i, o] - zero[g_idx[i], o])``. v1 zeros are read as
``stored + 1`` without wrapping, as the AutoGPTQ kernels do.
"""

from __future__ import annotations

import torch

from ..errors import UserInputError
from .bitpack import as_words, from_words, pack_bits, packed_bytes, unpack_bits

__all__ = ["GPTQ_TENSOR_NAMES", "gptq_tensor_shapes", "read_gptq_layer", "write_gptq_layer"]

GPTQ_TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")


def _check(bits: int, in_features: int, out_features: int, group_size: int) -> int:
    if bits not in (2, 3, 4, 8):
        raise UserInputError(f"GPTQ bits={bits} is not one of 2, 3, 4, 8")
    size = in_features if group_size == -1 else group_size
    if in_features % size or (in_features * bits) % 32 or (out_features * bits) % 32:
        raise UserInputError(
            f"GPTQ layer {out_features}x{in_features} with bits={bits}, group_size={group_size} does not fit the "
            "packed layout (widths must fill whole 32-bit words and groups must divide in_features)"
        )
    return in_features // size


def gptq_tensor_shapes(bits: int, in_features: int, out_features: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """The shape of each GPTQ tensor of one layer."""
    groups = _check(bits, in_features, out_features, group_size)
    return {
        "qweight": (packed_bytes(in_features, bits) // 4, out_features),
        "qzeros": (groups, packed_bytes(out_features, bits) // 4),
        "scales": (groups, out_features),
        "g_idx": (in_features,),
    }


def read_gptq_layer(
    tensors: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int, group_size: int,
    checkpoint_format: str = "gptq",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes (out, in) uint8, scale (out, G), zero (out, G) float, g_idx (in,) long)`` from a layer's GPTQ tensors."""
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise UserInputError(f"GPTQ checkpoint_format={checkpoint_format!r} is not 'gptq' or 'gptq_v2'")
    _check(bits, in_features, out_features, group_size)
    codes = unpack_bits(from_words(tensors["qweight"].t()), bits, in_features)  # (out, in)
    zero = unpack_bits(from_words(tensors["qzeros"]), bits, out_features).t().float()  # (out, G)
    if checkpoint_format == "gptq":
        zero = zero + 1
    scale = tensors["scales"].t()  # (out, G)
    return codes, scale, zero, tensors["g_idx"].long()


def write_gptq_layer(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor, bits: int,
    checkpoint_format: str = "gptq",
) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of a layer (inverse of :func:`read_gptq_layer`; v1 stores ``(zero - 1) mod 2**bits``)."""
    stored_zero = zero.round().long()
    if checkpoint_format == "gptq":
        stored_zero = (stored_zero - 1) & (2**bits - 1)
    return {
        "qweight": as_words(pack_bits(codes, bits)).t().contiguous(),  # (in * bits / 32, out)
        "qzeros": as_words(pack_bits(stored_zero.t(), bits)),  # (G, out * bits / 32)
        "scales": scale.t().to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }
