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
import functools
import threading
from collections.abc import Callable, Iterator

import torch

from ..formats import LinearFormat
from .reference import dense_weight, reference_linear

__all__ = ["KERNELS", "bitmask_linear", "int_linear", "nm_linear", "reference_only", "register_kernel", "run", "status"]

Kernel = Callable[..., torch.Tensor]
# op name -> device type -> (kernel, description); filled by :mod:`hf_compress_prompt.kernels` on import (the C
# kernels on the CPU, Triton on CUDA). A device without an entry runs the reference (:func:`run`).
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


def run(op: str, x: torch.Tensor, fmt: LinearFormat, tensors: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """What ``op`` computes for ``x`` and a layer stored in ``fmt`` (``tensors``: its stored tensors but the bias),
    called directly: the registered kernel for ``x``'s device, else the reference (always the reference inside
    :func:`reference_only`). The runtime modules call it in eager CPU forwards, skipping the op's dispatch."""
    entry = None if getattr(_local, "reference", False) else KERNELS[op].get(x.device.type)
    return (entry[0] if entry else reference_linear)(x, fmt, tensors, bias)



def _quant(tensors: dict, scale, zero, g_idx=None) -> None:
    if scale is not None:
        tensors["weight_scale"], tensors["weight_zero"] = scale, zero
    if g_idx is not None:
        tensors["weight_g_idx"] = g_idx


# ----- formats rebuilt from op arguments ----------------------------------------------------------------------------
def _format(in_features: int, out_features: int, bits: int | None, group_size: int, sparsity: str | None = None,
             nnz: int | None = None, g_idx: bool = False) -> LinearFormat:
    """One (validated, immutable) format per distinct argument set: a model has a handful of layer shapes, and
    building and validating a format on every call cost more than a small layer's matmul. Symbolic sizes (tracing
    with dynamic shapes) are not hashable: those build a fresh format."""
    args = (in_features, out_features, bits, group_size, sparsity, nnz, g_idx)
    if any(isinstance(a, torch.SymInt) for a in args):
        return LinearFormat(in_features, out_features, bits=bits, group_size=group_size, sparsity=sparsity, nnz=nnz,
                            g_idx=g_idx)
    return _cached_format(*args)


@functools.lru_cache(maxsize=4096)
def _cached_format(in_features, out_features, bits, group_size, sparsity, nnz, g_idx) -> LinearFormat:
    return LinearFormat(in_features, out_features, bits=bits, group_size=group_size, sparsity=sparsity, nnz=nnz,
                        g_idx=g_idx)


def _int_format(weight, scale, g_idx, in_features, bits, group_size) -> LinearFormat:
    return _format(in_features, weight.shape[0], bits, group_size, g_idx=g_idx is not None)


def _nm_format(index, in_features, n, m, bits, group_size) -> LinearFormat:
    return _format(in_features, index.shape[0], bits or None, group_size, f"{n}:{m}")


def _bitmask_format(mask, in_features, nnz, bits, group_size) -> LinearFormat:
    return _format(in_features, mask.shape[0], bits or None, group_size, "bitmask", nnz)


# ----- the ops: schema, implementation (any device: run picks the kernel) and fake ----------------------------------
# Defined with the low-level ``torch.library.Library`` rather than ``@custom_op``: the latter's Python wrapper costs
# about 7 us more per call, which a compiled decode step pays on each of its 211 linear layers.
_LIB = torch.library.Library("hf_compress_prompt", "DEF")
_SCHEMAS = {
    "int_linear": "Tensor weight, Tensor scale, Tensor zero, Tensor? g_idx, Tensor? bias, int in_features, int bits, "
                  "int group_size",
    "nm_linear": "Tensor weight, Tensor index, Tensor? scale, Tensor? zero, Tensor? bias, int in_features, int n, "
                 "int m, int bits, int group_size",
    "bitmask_linear": "Tensor weight, Tensor mask, Tensor? scale, Tensor? zero, Tensor? bias, int in_features, "
                      "int nnz, int bits, int group_size",
}


def _define(name: str, rebuild: Callable[[tuple], tuple[LinearFormat, dict, torch.Tensor | None]]) -> None:
    _LIB.define(f"{name}(Tensor x, {_SCHEMAS[name]}) -> Tensor")

    def implementation(x, *args):
        fmt, tensors, bias = rebuild(args)
        return run(name, x, fmt, tensors, bias)

    def fake(x, *args):  # output rows: the weight's (int) or the index's / mask's (sparse) first dimension
        return x.new_empty(*x.shape[:-1], (args[0] if name == "int_linear" else args[1]).shape[0])

    _LIB.impl(name, implementation, "CompositeExplicitAutograd")
    torch.library.register_fake(f"hf_compress_prompt::{name}", fake, lib=_LIB)


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


for _name, _rebuild in (("int_linear", _int_rebuild), ("nm_linear", _nm_rebuild), ("bitmask_linear", _bitmask_rebuild)):
    _define(_name, _rebuild)
    torch.library.register_autograd(f"hf_compress_prompt::{_name}", _backward_for(_rebuild), setup_context=_setup,
                                    lib=_LIB)

int_linear = torch.ops.hf_compress_prompt.int_linear
nm_linear = torch.ops.hf_compress_prompt.nm_linear
bitmask_linear = torch.ops.hf_compress_prompt.bitmask_linear
