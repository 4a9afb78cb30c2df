"""Loading GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum layout, see :mod:`hf_compress_prompt.formats.gptq`)
into :class:`~hf_compress_prompt.nn.QuantLinear` on any device, without GPTQModel: a placeholder module receives
the GPTQ tensors under their own names, then is repacked into our layout once the weights are in (the transformers
quantizer, :mod:`.transformers_quantizer`, calls both steps)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserInputError
from ..formats import LinearFormat, gptq_tensor_shapes, pack_linear, read_gptq_layer
from ..nn import packed_linear_from
from ..validation import static_group_index
from .safetensors_check import CheckpointError, check_tensors

__all__ = ["GPTQImportLinear", "install_gptq_modules", "repack_gptq_modules"]


class GPTQImportLinear(nn.Module):
    """Holds one layer's GPTQ tensors until :func:`repack_gptq_modules` replaces it; it has no forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool, gptq: dict, dtype: torch.dtype, device="meta"):
        super().__init__()
        self.in_features, self.out_features, self.gptq, self.float_dtype = in_features, out_features, gptq, dtype
        shapes = gptq_tensor_shapes(gptq["bits"], in_features, out_features, gptq.get("group_size", -1))
        dtypes = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32}
        for name, shape in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtypes[name], device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    def forward(self, x):
        raise RuntimeError("GPTQImportLinear is a loading placeholder; load through from_pretrained so it is repacked")


def _shape_of(module: nn.Module) -> tuple[int, int]:
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    if hasattr(module, "nf") and hasattr(module, "weight"):  # GPT-2 Conv1D: weight (in, out)
        return module.weight.shape[0], module.nf
    raise UserInputError(f"cannot tell the shape of {type(module).__name__}")


def install_gptq_modules(model: nn.Module, gptq: dict, found: dict[str, dict] | None, dtype: torch.dtype) -> None:
    """Replaces every module that has a ``<name>.qweight`` tensor in the checkpoint with a placeholder."""
    if found is None:
        raise CheckpointError("loading a GPTQ checkpoint needs its safetensors files")
    if "bits" not in gptq:
        raise CheckpointError("the GPTQ quantization_config has no 'bits'")
    names = sorted(key[: -len(".qweight")] for key in found if key.endswith(".qweight"))
    if not names:
        raise CheckpointError("the GPTQ checkpoint holds no '*.qweight' tensor")
    for name in names:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the GPTQ checkpoint has tensors for {name!r}, which this model does not have") from None
        in_features, out_features = _shape_of(old)
        shapes = gptq_tensor_shapes(gptq["bits"], in_features, out_features, gptq.get("group_size", -1))
        check_tensors({f"{name}.{k}": (v, None) for k, v in shapes.items()}, found)
        module = GPTQImportLinear(in_features, out_features, f"{name}.bias" in found, gptq, dtype)
        model.set_submodule(name, module)


@torch.no_grad()
def repack_gptq_modules(model: nn.Module) -> dict[str, LinearFormat]:
    """Replaces every loaded :class:`GPTQImportLinear` with a :class:`~hf_compress_prompt.nn.QuantLinear`; returns
    the layers' formats."""
    formats = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, GPTQImportLinear):
            continue
        g = module.gptq
        bits, group_size = g["bits"], g.get("group_size", -1)
        codes, scale, zero, g_idx = read_gptq_layer(
            {k: getattr(module, k) for k in ("qweight", "qzeros", "scales", "g_idx")}, bits, module.in_features,
            module.out_features, group_size, g.get("checkpoint_format", "gptq"),
        )
        trivial = torch.equal(g_idx.cpu(), static_group_index(module.in_features, group_size))
        fmt = LinearFormat(module.in_features, module.out_features, bias=module.bias is not None, bits=bits,
                           group_size=group_size, symmetric=bool(g.get("sym", True)), g_idx=not trivial,
                           act_order=bool(g.get("desc_act", False)))
        tensors = pack_linear(fmt, torch.empty(module.out_features, module.in_features, device="meta"), codes=codes,
                              scale=scale, zero=zero, g_idx=g_idx, bias=module.bias, float_dtype=module.float_dtype,
                              name=name)
        model.set_submodule(name, packed_linear_from(fmt, tensors))
        formats[name] = fmt
    return formats
