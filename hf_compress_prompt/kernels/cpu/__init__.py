"""C kernels for the CPU: which layers they serve, and the entry points the package's ``torch.library`` ops call
(``hf_compress_prompt.kernels.ops`` keeps the schema, the fake implementations and autograd).

- :mod:`.library`: compiles the C sources (``linear.c``, ``tiled.c``) at first use, caches and verifies the
  library, loads it with ``ctypes`` and reads the CPU's features;
- :mod:`.layouts`: the load-time layouts of a stored layer (pure tensor maths);
- :mod:`.plan`: a layer as the kernels see it (built once per layer, cached) and the row split over threads.

Set ``HF_COMPRESS_PROMPT_KERNELS=reference`` to disable them.
"""

from __future__ import annotations

import torch

from ...formats import LinearFormat
from ..reference import reference_linear
from . import library, plan
from .library import CACHE_ENV, available, build, cache_note, unavailable_reason
from .plan import LayerPlan, cache_bytes

__all__ = [
    "CACHE_ENV",
    "LayerPlan",
    "available",
    "bitmask_int4_linear",
    "build",
    "cache_bytes",
    "cache_note",
    "int_linear",
    "kernel_name",
    "prepare",
    "sparse_bf16_linear",
    "sparse_linear",
    "supports",
    "supports_dense",
    "unavailable_reason",
]


def kernel_name(kind: str = "int", bits: int | None = 4) -> str:
    """The kernel that serves a storage kind (``"int"``, ``"bitmask"``, ``"nm"``; ``bits=None`` for float values)."""
    library.load()
    if bits is None:
        return ("C sparse bf16, AVX-512 BF16 + VBMI2" if library._use_bf16
                else "C sparse bf16, portable (no AVX-512 BF16 / VBMI2 on this CPU)")
    if kind in ("bitmask", "nm"):
        return ("C bitmask / N:M sparse int4 x int8 in 16-row tiles (codes expanded in registers), AVX-512 VNNI + "
                "VBMI2" if library._use_tiled
                else "C bitmask / N:M sparse int4 x int8 in 16-row tiles, portable (no AVX-512 VBMI2 here)")
    if bits == 8:
        return ("C int8 x int8, AVX-512 VNNI" if library._use_vnni
                else "C int8 x int8, portable (no AVX-512 VNNI on this CPU)")
    return ("C int4 x int8 in 16-row tiles, AVX-512 VNNI + VBMI2" if library._use_tiled
            else "C int4 x int8 in 16-row tiles, portable (no AVX-512 VNNI + VBMI2 on this CPU)")


def supports(fmt: LinearFormat, dtype: torch.dtype | None = None) -> str | None:
    """``None`` when a C kernel serves ``fmt`` (with values / activations in ``dtype``), else why not."""
    if fmt.bits is None:
        if fmt.in_features % 64:
            return f"in_features={fmt.in_features} is not a multiple of 64"
        if dtype is not None and dtype != torch.bfloat16:
            return f"sparse {dtype} values: the CPU kernel covers bf16 values (a bf16 model)"
        return None
    if fmt.bits not in (4, 8) or (fmt.bits == 8 and fmt.kind != "int"):
        return f"{fmt.describe()}: the CPU kernels cover int4 (dense, bitmask or N:M sparse) and dense int8"
    if fmt.g_idx:
        return "explicit g_idx (act-order without static groups)"
    if fmt.in_features % 64 or fmt.effective_group_size % 64:
        return f"in_features={fmt.in_features} / group size {fmt.effective_group_size} not multiples of 64"
    return None


def supports_dense(fmt: LinearFormat) -> str | None:
    """``None`` when the dense int4 / int8 kernel serves ``fmt``, else why not."""
    if fmt.kind != "int":
        return f"{fmt.describe()}: not a dense integer layer"
    return supports(fmt)


def prepare(fmt: LinearFormat, tensors: dict[str, torch.Tensor]) -> LayerPlan | None:
    """Builds (once, cached) the kernel's load-time layout of a layer; `None` when no C kernel serves it."""
    prepared = plan.lookup(tensors)  # every call after the first: only this lookup
    if prepared is not None:
        return prepared
    if library.load() is None:
        return None
    if fmt.kind == "int":
        if supports_dense(fmt) is not None:
            return None
        kind = plan.TILED if fmt.bits == 4 else plan.DENSE8
    elif fmt.bits is None:
        if supports(fmt, tensors["weight"].dtype) is not None:
            return None
        kind = plan.SPARSE_BF16
    else:
        if supports(fmt) is not None:
            return None
        kind = plan.TILED_SPARSE
    return plan.cached(tensors, lambda t: plan.build_plan(kind, fmt, t))


def _linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
    """The layer's C kernel (chosen and built once by :func:`prepare`), or the reference op where none applies."""
    layer = prepare(fmt, tensors) if x.device.type == "cpu" else None
    return reference_linear(x, fmt, tensors, bias) if layer is None else layer(library._lib, x, bias)


def int_linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
    """``x @ W.T + bias`` for a dense int4 or int8 layer, through the C kernel when it applies (else the
    reference)."""
    return _linear(x, fmt, tensors, bias)


def bitmask_int4_linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
    """``x @ W.T + bias`` for a sparse int4 layer (bitmask, e.g. SparseGPT 50% + 4-bit, or N:M), through the C
    kernel when it applies (else the reference)."""
    return _linear(x, fmt, tensors, bias)


def sparse_bf16_linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor], bias):
    """``x @ W.T + bias`` for a pruned (not quantized) layer of a bf16 model, through the C kernel when it applies."""
    if fmt.bits is not None or x.dtype != torch.bfloat16:  # the kernel multiplies bf16 activations only
        return reference_linear(x, fmt, tensors, bias)
    return _linear(x, fmt, tensors, bias)


def sparse_linear(x: torch.Tensor, fmt: LinearFormat, tensors: dict[str, torch.Tensor], bias):
    """The CPU kernel for a sparse layer: int4 values or bf16 values."""
    if fmt.bits is None:
        return sparse_bf16_linear(x, fmt, tensors, bias)
    return bitmask_int4_linear(x, fmt, tensors, bias)
