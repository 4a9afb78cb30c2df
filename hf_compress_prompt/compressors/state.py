"""What compression steps hand to each other and to the caller: per-layer masks, grids and statistics, and the
:class:`CompressionResult` that ``compress_`` returns and ``pack_model`` reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

import torch
from torch import nn

from ..methods.quant_grid import QuantizedWeight
from .configs import Recipe

__all__ = ["CompressionResult", "CompressionState", "StepReport"]


@dataclass
class StepReport:
    """One step's outcome: wall time and, per compressed linear, what it achieved."""

    method: str
    seconds: float = 0.0
    layers: dict[str, dict] = field(default_factory=dict)  # qualified name -> {"sparsity": ..., "damp": ...}
    dropped_layers: list[int] = field(default_factory=list)
    layer_scores: list[float] = field(default_factory=list)


class CompressionState:
    """Masks and quantization grids per linear module, keyed by the module itself (so dropping layers, which
    renames modules, keeps them attached)."""

    def __init__(self, calibration_ids: torch.Tensor | None = None):
        self.calibration_ids = calibration_ids  # (nsamples, seqlen) or None
        self.masks: WeakKeyDictionary[nn.Module, torch.Tensor] = WeakKeyDictionary()  # True = pruned
        self.quantized: WeakKeyDictionary[nn.Module, QuantizedWeight] = WeakKeyDictionary()
        self.reports: list[StepReport] = []

    def by_name(self, model: nn.Module, table: WeakKeyDictionary) -> dict[str, object]:
        """``table`` re-keyed by the modules' current qualified names in ``model``."""
        return {name: table[m] for name, m in model.named_modules() if m in table}


@dataclass
class CompressionResult:
    """What ``compress_`` did: the recipe, a report per step, and per linear (by qualified name) the final pruning
    mask (True = pruned) and quantization grid."""

    recipe: Recipe
    reports: list[StepReport]
    masks: dict[str, torch.Tensor]
    quantized: dict[str, QuantizedWeight]
