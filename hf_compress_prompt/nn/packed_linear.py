"""Runtime modules for compressed linear layers: they hold exactly the tensors their :class:`LinearFormat`
declares (as buffers, so optimizers and PEFT never see them as trainable) and call the ``torch.library`` ops of
:mod:`hf_compress_prompt.kernels` in ``forward``."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels  # importing it registers torch.ops.hf_compress_prompt.*; kernels.run is the eager fast path
from ..formats import LinearFormat, pack_linear
from ..kernels import dense_weight

__all__ = [
    "BitmaskSparseLinear",
    "NMSparseLinear",
    "PackedLinear",
    "QuantLinear",
    "has_packed_layers",
    "layer_status",
    "pack_module",
    "packed_linear_class",
    "packed_linear_from",
]


class PackedLinear(nn.Module):
    """A linear layer ``y = x W^T + b`` whose ``W`` is stored in ``fmt``. Use a subclass (one per storage kind)."""

    def __init__(self, fmt: LinearFormat, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.fmt = fmt
        self.in_features, self.out_features = fmt.in_features, fmt.out_features
        dtype = dtype or torch.get_default_dtype()
        for name, spec in fmt.tensor_specs().items():
            tensor = torch.empty(spec.shape, dtype=spec.resolve(dtype), device=device)
            if name == "bias":
                self.bias = nn.Parameter(tensor, requires_grad=False)
            else:
                self.register_buffer(name, tensor)
        if not fmt.bias:
            self.register_parameter("bias", None)
        self._names = tuple(name for name in fmt.tensor_specs() if name != "bias")
        self._stored: dict[str, torch.Tensor] | None = None

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The format's tensors other than the bias (cached: rebuilt after ``.to()`` or a reassignment)."""
        stored = self._stored
        if stored is None or stored["weight"] is not self._buffers["weight"]:  # also catches direct _buffers writes
            stored = self._stored = {name: getattr(self, name) for name in self._names}
        return stored

    def __setattr__(self, name, value):
        if name in getattr(self, "_names", ()):
            self.__dict__["_stored"] = None
        super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        self._stored = None  # .to(), .half(), .cuda() replace the buffers
        return super()._apply(fn, *args, **kwargs)

    @property
    def float_dtype(self) -> torch.dtype:
        t = self.stored_tensors()
        return t["weight_scale"].dtype if "weight_scale" in t else t["weight"].dtype

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight `(out, in)` this layer represents."""
        return dense_weight(self.fmt, self.stored_tensors(), dtype or self.float_dtype)

    def to_linear(self) -> nn.Linear:
        """An equivalent dense ``nn.Linear``."""
        weight = self.dequantize_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=weight.dtype,
                           device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer's tensors (bias included)."""
        return sum(t.numel() * t.element_size() for t in [*self.stored_tensors().values(), *(
            [self.bias] if self.bias is not None else [])])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.describe()}"

    def _eager_fast_path(self, x: torch.Tensor) -> bool:
        """Plain eager inference on a real CPU tensor: call the kernel directly, skipping the ``torch.library``
        dispatcher (tens of microseconds per call, more than a small layer's matmul). Compilation, fake tensors and
        anything that needs a gradient go through the registered op."""
        return (type(x) is torch.Tensor and x.device.type == "cpu" and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))))

    def _grid(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.fmt.bits:
            return self.weight_scale, self.weight_zero
        return None, None


class QuantLinear(PackedLinear):
    """Dense integer codes with group scales and zeros (``int_linear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fmt
        if self._eager_fast_path(x):
            return kernels.run("int_linear", x, f, self.stored_tensors(), self.bias)
        g_idx = self.weight_g_idx if f.g_idx else None
        return torch.ops.hf_compress_prompt.int_linear(
            x, self.weight, self.weight_scale, self.weight_zero, g_idx, self.bias, f.in_features, f.bits, f.group_size
        )


class NMSparseLinear(PackedLinear):
    """N:M sparse: ``n`` kept values per run of ``m`` inputs plus their positions, float or integer (``nm_linear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fmt
        if self._eager_fast_path(x):
            return kernels.run("nm_linear", x, f, self.stored_tensors(), self.bias)
        n, m = f.nm
        scale, zero = self._grid()
        return torch.ops.hf_compress_prompt.nm_linear(
            x, self.weight, self.weight_index, scale, zero, self.bias, f.in_features, n, m, f.bits or 0, f.group_size
        )


class BitmaskSparseLinear(PackedLinear):
    """Unstructured sparse: a 1-bit keep mask plus the kept values, float or integer (``bitmask_linear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fmt
        if self._eager_fast_path(x):
            return kernels.run("bitmask_linear", x, f, self.stored_tensors(), self.bias)
        scale, zero = self._grid()
        return torch.ops.hf_compress_prompt.bitmask_linear(
            x, self.weight, self.weight_mask, scale, zero, self.bias, f.in_features, f.nnz, f.bits or 0, f.group_size
        )


_CLASSES = {"int": QuantLinear, "nm": NMSparseLinear, "bitmask": BitmaskSparseLinear}


def packed_linear_class(fmt: LinearFormat) -> type[PackedLinear]:
    return _CLASSES[fmt.kind]


def packed_linear_from(fmt: LinearFormat, tensors: dict[str, torch.Tensor]) -> PackedLinear:
    """A module holding ``tensors`` (as produced by :func:`~hf_compress_prompt.formats.pack_linear`)."""
    some = tensors["weight"]
    float_dtype = next((t.dtype for n, t in tensors.items() if t.is_floating_point()), torch.get_default_dtype())
    module = packed_linear_class(fmt)(fmt, dtype=float_dtype, device=some.device)
    with torch.no_grad():
        for name, tensor in tensors.items():
            target = getattr(module, name)
            if tuple(target.shape) != tuple(tensor.shape) or target.dtype != tensor.dtype:
                raise ValueError(f"tensor {name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"the format needs {tuple(target.shape)} {target.dtype}")
            target.copy_(tensor)
    return module


def pack_module(fmt: LinearFormat, weight: torch.Tensor, bias: torch.Tensor | None, **parts) -> PackedLinear:
    """Packs a dense layer's parts (see :func:`~hf_compress_prompt.formats.pack_linear`) into its runtime module."""
    return packed_linear_from(fmt, pack_linear(fmt, weight, bias=bias, **parts))


def has_packed_layers(module: nn.Module) -> bool:
    """Whether ``module`` (a model or a block) holds any packed (compressed) layer."""
    return any(isinstance(m, PackedLinear) for m in module.modules())


def layer_status(model: nn.Module) -> dict[str, str]:
    """For each packed layer of ``model``: which implementation its forward uses on the CPU, and why
    (:func:`hf_compress_prompt.kernels.cpu_kernel_for`)."""
    return {name: kernels.cpu_kernel_for(module.fmt, module.stored_tensors()["weight"].dtype)
            for name, module in model.named_modules() if isinstance(module, PackedLinear)}
