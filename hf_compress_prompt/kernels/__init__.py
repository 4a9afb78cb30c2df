"""Compressed-linear ops behind ``torch.library`` (``torch.ops.hf_compress_prompt.*``), each with a pure-PyTorch
reference, a fake implementation for ``torch.compile``, and a slot for faster per-device kernels.
:func:`status` says which implementation serves each op and why optional kernels are not in use."""

from .ops import KERNELS, bitmask_linear, int_linear, nm_linear, record_unavailable, register_kernel, status
from .reference import dense_weight, reference_linear

__all__ = [
    "KERNELS",
    "bitmask_linear",
    "dense_weight",
    "int_linear",
    "nm_linear",
    "record_unavailable",
    "reference_linear",
    "register_kernel",
    "status",
]
