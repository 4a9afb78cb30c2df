"""Compressed-linear ops behind ``torch.library`` (``torch.ops.hf_compress_prompt.*``), each with a pure-PyTorch
reference, a fake implementation for ``torch.compile``, and a slot for faster per-device kernels.
:func:`status` says which implementation serves each op and why optional kernels are not in use; :func:`run` is
what an op computes, called directly (the runtime modules' eager path)."""

import torch

from ..formats import LinearFormat
from . import cpu as _cpu
from .ops import (
    KERNELS,
    bitmask_linear,
    int_linear,
    nm_linear,
    record_unavailable,
    reference_only,
    register_kernel,
    run,
    status,
)
from .reference import dense_weight, reference_linear


def _cpu_description(kind: str):
    def describe() -> str:
        reason = _cpu.unavailable_reason()  # builds the C kernels on first call (about a second, then cached)
        note = _cpu.cache_note()  # a refused cache folder or a rebuilt library: said even when the kernels run
        if reason is not None:
            return f"reference (pure PyTorch): {reason}" + (f" ({note})" if note else "")
        if kind == "int":
            text = (f"{_cpu.kernel_name(kind)} for int4, {_cpu.kernel_name(kind, 8)} for int8, group size a multiple "
                    "of 64; reference otherwise")
        else:
            text = (f"{_cpu.kernel_name(kind)} for int4 values (group size a multiple of 64); "
                    f"{_cpu.kernel_name(kind, None)} for bf16 values; reference otherwise")
        return text + (f" ({note})" if note else "")

    return describe


register_kernel("int_linear", "cpu", _cpu.int_linear, _cpu_description("int"))

from . import triton as _triton  # noqa: E402

if _triton.available() and torch.cuda.is_available():
    register_kernel("int_linear", "cuda", _triton.int4_linear, "Triton int4 (de-quantize in registers, tl.dot)")
    for _op in ("bitmask_linear", "nm_linear"):
        register_kernel(_op, "cuda", _triton.sparse_int4_linear,
                        "Triton 2:4 / bitmask + int4 (kept codes only, rebuilt dense in registers, tl.dot)")
else:
    record_unavailable("triton int4, 2:4 / bitmask + int4 (cuda)", _triton.unavailable_reason() or "no CUDA device")
register_kernel("bitmask_linear", "cpu", _cpu.sparse_linear, _cpu_description("bitmask"))
register_kernel("nm_linear", "cpu", _cpu.sparse_linear, _cpu_description("nm"))


def cpu_kernel_for(fmt: LinearFormat, weight_dtype: torch.dtype) -> str:
    """Which implementation a CPU forward of a layer stored in ``fmt`` (its ``weight`` tensor in ``weight_dtype``)
    runs: the C kernel's name, or ``"reference: <why not the C kernel>"``. Per model:
    :func:`hf_compress_prompt.nn.layer_status`."""
    why = _cpu.supports(fmt, weight_dtype)
    if why is None and _cpu.available():
        return _cpu.kernel_name(fmt.kind, fmt.bits)
    return f"reference: {why or _cpu.unavailable_reason()}"


__all__ = [
    "KERNELS",
    "bitmask_linear",
    "cpu_kernel_for",
    "dense_weight",
    "int_linear",
    "nm_linear",
    "record_unavailable",
    "reference_linear",
    "reference_only",
    "register_kernel",
    "run",
    "status",
]
