"""The compressed-linear ops, registered with ``torch.library`` under the ``hf_compress_prompt`` namespace.

One op per storage kind (``int_linear``: dense integer codes; ``nm_linear``: N:M values, float or integer;
``bitmask_linear``: unstructured bitmask values, float or integer). Each has

- an implementation that dispatches to the best registered kernel for the input's device (the pure-PyTorch
  reference in :mod:`.reference` until faster kernels register themselves with :func:`register_kernel`),
- a fake (meta) implementation, so ``torch.compile`` and meta-device tracing see the output shape,
- an autograd formula for the input (``dL/dx = dL/dy @ W``), so a soft prompt can train through frozen compressed
  layers; the stored tensors are not differentiable.

``bits=0`` means float values (sparse layers that are not quantized).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch.library import custom_op

from ..formats import LinearFormat
from .reference import dense_weight, reference_linear

__all__ = ["int_linear", "nm_linear", "bitmask_linear", "register_kernel", "status", "reference_only", "KERNELS"]

Kernel = Callable[..., torch.Tensor]
# op name -> device type -> (kernel, description); filled by the reference below and by the kernels issue.
KERNELS: dict[str, dict[str, tuple[Kernel, str]]] = {"int_linear": {}, "nm_linear": {}, "bitmask_linear": {}}
_UNAVAILABLE: dict[str, str] = {}  # kernel name -> why it is not registered


def register_kernel(op: str, device_type: str, kernel: Kernel, description: str | Callable[[], str]) -> None:
    """Makes ``kernel(x, fmt, tensors, bias)`` serve ``op`` for inputs on ``device_type`` (``"cpu"``, ``"cuda"``).
    The kernel itself falls back to :func:`~.reference.reference_linear` for formats it does not cover;
    ``description`` (or a function returning it) is what :func:`status` reports."""
    if op not in KERNELS:
        raise ValueError(f"unknown op {op!r}; ops are {sorted(KERNELS)}")
    KERNELS[op][device_type] = (kernel, description)


def record_unavailable(name: str, reason: str) -> None:
    """Records why an optional kernel is not in use (shown by :func:`status`)."""
    _UNAVAILABLE[name] = reason


def status() -> dict:
    """Which kernel serves each op on each device, and why optional kernels are unavailable."""
    return {
        "ops": {op: {dev: desc() if callable(desc) else desc for dev, (_, desc) in table.items()}
                or {"*": "reference (pure PyTorch)"} for op, table in KERNELS.items()},
        "unavailable": dict(_UNAVAILABLE),
    }


_local = threading.local()


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Inside this block (on this thread) every op runs its pure-PyTorch reference: exact de-quantized weights,
    no activation quantization. Use it to compare a packed model with its fake-quantized twin."""
    previous = getattr(_local, "reference", False)
    _local.reference = True
    try:
        yield
    finally:
        _local.reference = previous


def run_kernel(op: str, x: torch.Tensor, fmt: LinearFormat, tensors: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """What the op computes, called directly: the registered kernel for ``x``'s device, else the reference."""
    entry = None if getattr(_local, "reference", False) else KERNELS[op].get(x.device.type)
    return (entry[0] if entry else reference_linear)(x, fmt, tensors, bias)



def _quant(tensors: dict, scale, zero, g_idx=None) -> None:
    if scale is not None:
        tensors["weight_scale"], tensors["weight_zero"] = scale, zero
    if g_idx is not None:
        tensors["weight_g_idx"] = g_idx


# ----- formats rebuilt from op arguments ----------------------------------------------------------------------------
def _int_format(weight, scale, g_idx, in_features, bits, group_size) -> LinearFormat:
    return LinearFormat(in_features, weight.shape[0], bits=bits, group_size=group_size, g_idx=g_idx is not None)


def _nm_format(index, in_features, n, m, bits, group_size) -> LinearFormat:
    return LinearFormat(in_features, index.shape[0], bits=bits or None, group_size=group_size, sparsity=f"{n}:{m}")


def _bitmask_format(mask, in_features, nnz, bits, group_size) -> LinearFormat:
    return LinearFormat(in_features, mask.shape[0], bits=bits or None, group_size=group_size, sparsity="bitmask", nnz=nnz)


# ----- int_linear -------------------------------------------------------------------------------------------------
@custom_op("hf_compress_prompt::int_linear", mutates_args=())
def int_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor | None,
    bias: torch.Tensor | None, in_features: int, bits: int, group_size: int,
) -> torch.Tensor:
    fmt, tensors, bias = _int_rebuild((weight, scale, zero, g_idx, bias, in_features, bits, group_size))
    return run_kernel("int_linear", x, fmt, tensors, bias)


@int_linear.register_fake
def _(x, weight, scale, zero, g_idx, bias, in_features, bits, group_size):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# ----- nm_linear --------------------------------------------------------------------------------------------------
@custom_op("hf_compress_prompt::nm_linear", mutates_args=())
def nm_linear(
    x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
    bias: torch.Tensor | None, in_features: int, n: int, m: int, bits: int, group_size: int,
) -> torch.Tensor:
    fmt, tensors, bias = _nm_rebuild((weight, index, scale, zero, bias, in_features, n, m, bits, group_size))
    return run_kernel("nm_linear", x, fmt, tensors, bias)


@nm_linear.register_fake
def _(x, weight, index, scale, zero, bias, in_features, n, m, bits, group_size):
    return x.new_empty(*x.shape[:-1], index.shape[0])


# ----- bitmask_linear ---------------------------------------------------------------------------------------------
@custom_op("hf_compress_prompt::bitmask_linear", mutates_args=())
def bitmask_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
    bias: torch.Tensor | None, in_features: int, nnz: int, bits: int, group_size: int,
) -> torch.Tensor:
    fmt, tensors, bias = _bitmask_rebuild((weight, mask, scale, zero, bias, in_features, nnz, bits, group_size))
    return run_kernel("bitmask_linear", x, fmt, tensors, bias)


@bitmask_linear.register_fake
def _(x, weight, mask, scale, zero, bias, in_features, nnz, bits, group_size):
    return x.new_empty(*x.shape[:-1], mask.shape[0])


# ----- autograd: dL/dx = dL/dy @ W, dL/dbias = sum of dL/dy; stored tensors get no gradient -------------------------
_BIAS = 5  # every op takes (x, weight, <2 or 3 tensors>, bias, ...) with bias at argument 5


def _setup(ctx, inputs, output):
    args = inputs[1:]
    ctx.is_tensor = [a is None or isinstance(a, torch.Tensor) for a in args]
    ctx.save_for_backward(*(a for a, t in zip(args, ctx.is_tensor) if t))
    ctx.consts = [a for a, t in zip(args, ctx.is_tensor) if not t]
    ctx.x_dtype = inputs[0].dtype


def _backward_for(rebuild: Callable[[tuple], tuple[LinearFormat, dict, torch.Tensor | None]]):
    def backward(ctx, grad):
        saved, consts = iter(ctx.saved_tensors), iter(ctx.consts)
        args = tuple(next(saved) if t else next(consts) for t in ctx.is_tensor)
        fmt, tensors, bias = rebuild(args)
        weight = dense_weight(fmt, tensors, grad.dtype)  # (out, in)
        grads = [None] * (len(args) + 1)
        grads[0] = (grad @ weight).to(ctx.x_dtype)  # (..., in)
        if bias is not None and ctx.needs_input_grad[_BIAS]:
            grads[_BIAS] = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)
        return tuple(grads)

    return backward


def _int_rebuild(args):
    weight, scale, zero, g_idx, bias, in_features, bits, group_size = args
    tensors = {"weight": weight}
    _quant(tensors, scale, zero, g_idx)
    return _int_format(weight, scale, g_idx, in_features, bits, group_size), tensors, bias


def _nm_rebuild(args):
    weight, index, scale, zero, bias, in_features, n, m, bits, group_size = args
    tensors = {"weight": weight, "weight_index": index}
    _quant(tensors, scale, zero)
    return _nm_format(index, in_features, n, m, bits, group_size), tensors, bias


def _bitmask_rebuild(args):
    weight, mask, scale, zero, bias, in_features, nnz, bits, group_size = args
    tensors = {"weight": weight, "weight_mask": mask}
    _quant(tensors, scale, zero)
    return _bitmask_format(mask, in_features, nnz, bits, group_size), tensors, bias


int_linear.register_autograd(_backward_for(_int_rebuild), setup_context=_setup)
nm_linear.register_autograd(_backward_for(_nm_rebuild), setup_context=_setup)
bitmask_linear.register_autograd(_backward_for(_bitmask_rebuild), setup_context=_setup)
