"""PEFT LoRA on packed layers: ``y = packed(x) + B(A(dropout(x))) * scaling``, the packed weights untouched.

Registered per config with PEFT's custom-module API (``LoraConfig._register_custom_module``), as PEFT's own GPTQ
LoRA layer is built: the adapter never merges into the packed codes (that would break the 4-bit grid and the
sparsity mask), so it stays a separate low-rank branch.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from torch import nn

from ..nn import PackedLinear, has_packed_layers

__all__ = ["PackedLoraLinear", "lora_config_for"]


class PackedLoraLinear(nn.Module, LoraLayer):
    """A LoRA branch beside a :class:`~hf_compress_prompt.nn.PackedLinear` (no merging)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1,
                 **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError("LoRA on packed layers does not support DoRA; set use_dora=False")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return base.in_features, base.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        return None

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError("a LoRA adapter cannot merge into packed (quantized / sparse) weights; keep it "
                                  "as a separate branch, or dequantize the model first")

    def unmerge(self) -> None:
        return

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, lora_A.weight.dtype)
            result = result + lora_B(lora_A(self.lora_dropout[name](h))) * self.scaling[name]  # (..., out)
        return result.to(dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def lora_config_for(model: nn.Module, **kwargs) -> LoraConfig:
    """A ``LoraConfig`` (task CAUSAL_LM) that also covers ``model``'s packed layers; ``kwargs`` go to LoraConfig."""
    config = LoraConfig(task_type="CAUSAL_LM", **kwargs)
    if has_packed_layers(model):
        config._register_custom_module({PackedLinear: PackedLoraLinear})
    return config
