"""Runtime modules for compressed layers (one per storage kind), calling the ops in :mod:`hf_compress_prompt.kernels`,
and a key/value cache that appends in place (:class:`GrowingCache`)."""

from .packed_linear import (
    BitmaskSparseLinear,
    NMSparseLinear,
    PackedLinear,
    QuantLinear,
    pack_module,
    packed_linear_class,
    packed_linear_from,
)
from .kv_cache import GrowingCache, GrowingLayer, use_growing_cache, uses_growing_cache

__all__ = [
    "BitmaskSparseLinear",
    "GrowingCache",
    "GrowingLayer",
    "NMSparseLinear",
    "PackedLinear",
    "QuantLinear",
    "pack_module",
    "packed_linear_class",
    "packed_linear_from",
    "use_growing_cache",
    "uses_growing_cache",
]
