"""Runtime modules for compressed layers (one per storage kind), calling the ops in :mod:`hf_compress_prompt.kernels`."""

from .packed_linear import (
    BitmaskSparseLinear,
    NMSparseLinear,
    PackedLinear,
    QuantLinear,
    pack_module,
    packed_linear_class,
    packed_linear_from,
)

__all__ = [
    "BitmaskSparseLinear",
    "NMSparseLinear",
    "PackedLinear",
    "QuantLinear",
    "pack_module",
    "packed_linear_class",
    "packed_linear_from",
]
