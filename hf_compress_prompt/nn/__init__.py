"""Runtime modules for compressed layers (one per storage kind), calling the ops in :mod:`hf_compress_prompt.kernels`,
which kernel each packed layer of a model runs (:func:`layer_status`), and a key/value cache that appends in place
(:class:`GrowingCache`)."""

from .kv_cache import GrowingCache, GrowingLayer, use_growing_cache, uses_growing_cache
from .packed_linear import (
    BitmaskSparseLinear,
    NMSparseLinear,
    PackedLinear,
    QuantLinear,
    has_packed_layers,
    layer_status,
    pack_module,
    packed_linear_class,
    packed_linear_from,
)

__all__ = [
    "BitmaskSparseLinear",
    "GrowingCache",
    "GrowingLayer",
    "NMSparseLinear",
    "PackedLinear",
    "QuantLinear",
    "has_packed_layers",
    "layer_status",
    "pack_module",
    "packed_linear_class",
    "packed_linear_from",
    "use_growing_cache",
    "uses_growing_cache",
]
