"""Compressed-linear ops behind ``torch.library`` (``torch.ops.hf_compress_prompt.*``), each with a pure-PyTorch
reference, a fake implementation for ``torch.compile``, and a slot for faster per-device kernels.
:func:`status` says which implementation serves each op and why optional kernels are not in use."""

import torch

from . import cpu as _cpu
from .ops import (
    KERNELS,
    bitmask_linear,
    int_linear,
    nm_linear,
    record_unavailable,
    reference_only,
    register_kernel,
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


def layer_status(model) -> dict[str, str]:
    """For each packed layer of ``model``: which implementation its forward uses on the CPU, and why."""
    from ..nn import PackedLinear

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, PackedLinear):
            continue
        why = _cpu.supports(module.fmt, module.stored_tensors()["weight"].dtype)
        if why is None and _cpu.available():
            out[name] = _cpu.kernel_name(module.fmt.kind, module.fmt.bits)
        else:
            out[name] = f"reference: {why or _cpu.unavailable_reason()}"
    return out

__all__ = [
    "KERNELS",
    "layer_status",
    "reference_only",
    "bitmask_linear",
    "dense_weight",
    "int_linear",
    "nm_linear",
    "record_unavailable",
    "reference_linear",
    "register_kernel",
    "status",
]
