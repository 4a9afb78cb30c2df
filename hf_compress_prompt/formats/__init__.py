"""On-disk formats of compressed layers: one schema (:class:`LinearFormat`), the bit packing they share, and the
GPTQ layout we read for interop."""

from .bitpack import pack_bits, packed_bytes, unpack_bits
from .gptq import GPTQ_TENSOR_NAMES, gptq_tensor_shapes, read_gptq_layer, write_gptq_layer
from .packing import group_index, pack_linear, unpack_codes, unpack_linear
from .schema import FORMAT_VERSION, RECIPE_CONFIG_KEY, LinearFormat, TensorSpec

__all__ = [
    "FORMAT_VERSION",
    "GPTQ_TENSOR_NAMES",
    "RECIPE_CONFIG_KEY",
    "LinearFormat",
    "TensorSpec",
    "gptq_tensor_shapes",
    "group_index",
    "pack_bits",
    "pack_linear",
    "packed_bytes",
    "read_gptq_layer",
    "unpack_bits",
    "unpack_codes",
    "unpack_linear",
    "write_gptq_layer",
]
