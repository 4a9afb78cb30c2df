"""Named compression settings, defined once: ``compress_(model, "gptq-w4-g64")``,
``hf-compress-prompt compress --preset sparsegpt-50%+w4-g64``, the demo's ``--recipe`` and every benchmark read them
from here, so a name means the same steps everywhere (and in docs/results).

Names follow ``<method>-<what>``: ``w4`` 4-bit weights, ``g64`` groups of 64 input columns (``perchannel``: one
group per output row), ``50%`` / ``2:4`` the sparsity, ``+`` a second part of the same setting (a joint step, or a
second step where the name says so), ``head4`` / ``head8`` the output head quantized too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..errors import UserInputError
from .configs import (
    CompressionConfig,
    GPTQConfig,
    LayerDropConfig,
    MagnitudeConfig,
    Recipe,
    RTNConfig,
    SparseGPTConfig,
    WandaConfig,
)

__all__ = ["Preset", "get_preset", "list_presets", "preset_steps", "register_preset"]


@dataclass(frozen=True)
class Preset:
    """A named list of recipe steps and a one-line description."""

    name: str
    description: str
    steps: tuple[CompressionConfig, ...]

    def recipe_steps(self) -> list[CompressionConfig]:
        """Fresh copies of the steps (a caller may change them without changing the preset)."""
        return [copy.deepcopy(step) for step in self.steps]


_PRESETS: dict[str, Preset] = {}


def register_preset(name: str, steps: list[CompressionConfig], description: str) -> Preset:
    """Registers ``steps`` under ``name``; a name already registered, an empty name or description, or steps that do
    not form a recipe are errors."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"a preset name must be a non-empty string without surrounding spaces, got {name!r}")
    if name in _PRESETS:
        raise ValueError(f"a preset named {name!r} is already registered ({_PRESETS[name].description})")
    if not description:
        raise ValueError(f"preset {name!r} needs a one-line description")
    Recipe(list(steps))  # at least one step, each a compression config, quantized at most once
    preset = Preset(name, description, tuple(copy.deepcopy(step) for step in steps))
    _PRESETS[name] = preset
    return preset


def get_preset(name: str) -> Preset:
    """The preset registered as ``name``; an unknown name is an error listing the known ones."""
    preset = _PRESETS.get(name)
    if preset is None:
        raise UserInputError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)}")
    return preset


def preset_steps(name: str) -> list[CompressionConfig]:
    """Fresh copies of the steps of the preset ``name``."""
    return get_preset(name).recipe_steps()


def list_presets() -> dict[str, str]:
    """Name -> description of every preset, in registration order."""
    return {name: preset.description for name, preset in _PRESETS.items()}


_W4G64 = {"bits": 4, "group_size": 64}
for _name, _steps, _description in [
    # round-to-nearest (no calibration data)
    ("rtn-w4-perchannel", [RTNConfig(bits=4)], "round-to-nearest 4-bit, one group per output channel"),
    ("rtn-w4-g64", [RTNConfig(**_W4G64)], "round-to-nearest 4-bit, groups of 64 (no calibration)"),
    ("rtn-w3-g64", [RTNConfig(bits=3, group_size=64)], "round-to-nearest 3-bit, groups of 64"),
    ("rtn-w8-g64", [RTNConfig(bits=8, group_size=64)], "round-to-nearest 8-bit, groups of 64"),
    ("rtn-w4-g64-head4", [RTNConfig(**_W4G64, lm_head=True)],
     "round-to-nearest 4-bit g64, the output head too (untied from the embedding)"),
    ("rtn-w4-g64-head8", [RTNConfig(**_W4G64, lm_head=True, lm_head_bits=8)],
     "round-to-nearest 4-bit g64, the output head in 8 bits"),
    # GPTQ
    ("gptq-w4-perchannel", [GPTQConfig(bits=4)], "GPTQ 4-bit, one group per output channel"),
    ("gptq-w4-g64", [GPTQConfig(**_W4G64)], "GPTQ 4-bit, groups of 64 (act-order, static groups: the default)"),
    ("gptq-w4-g64-noactorder", [GPTQConfig(**_W4G64, act_order=False)],
     "GPTQ 4-bit g64 in the natural column order (the reference's default)"),
    ("gptq-w3-g64", [GPTQConfig(bits=3, group_size=64)], "GPTQ 3-bit, groups of 64 (act-order)"),
    # pruning
    ("sparsegpt-50%", [SparseGPTConfig(sparsity=0.5)], "SparseGPT 50% unstructured"),
    ("sparsegpt-2:4", [SparseGPTConfig(sparsity="2:4")], "SparseGPT 2:4"),
    ("wanda-50%", [WandaConfig(sparsity=0.5)], "Wanda 50% unstructured"),
    ("wanda-2:4", [WandaConfig(sparsity="2:4")], "Wanda 2:4"),
    ("magnitude-50%", [MagnitudeConfig(sparsity=0.5)], "magnitude 50% unstructured (no calibration)"),
    ("magnitude-2:4", [MagnitudeConfig(sparsity="2:4")], "magnitude 2:4 (no calibration)"),
    # pruning + quantization
    ("sparsegpt-50%+w4-g64", [SparseGPTConfig(sparsity=0.5, **_W4G64)],
     "SparseGPT 50% + 4-bit g64 (joint), about 8x smaller linears"),
    ("sparsegpt-40%+w4-g64", [SparseGPTConfig(sparsity=0.4, **_W4G64)], "SparseGPT 40% + 4-bit g64 (joint)"),
    ("sparsegpt-60%+w4-g64", [SparseGPTConfig(sparsity=0.6, **_W4G64)], "SparseGPT 60% + 4-bit g64 (joint)"),
    ("sparsegpt-50%-then-gptq-w4-g64", [SparseGPTConfig(sparsity=0.5), GPTQConfig(**_W4G64)],
     "SparseGPT 50%, then GPTQ 4-bit g64 on the kept weights (two steps)"),
    ("magnitude-50%+rtn-w4-g64", [MagnitudeConfig(sparsity=0.5), RTNConfig(**_W4G64)],
     "magnitude 50%, then round-to-nearest 4-bit g64 (no calibration)"),
    ("magnitude-2:4+rtn-w4-g64", [MagnitudeConfig(sparsity="2:4"), RTNConfig(**_W4G64)],
     "magnitude 2:4, then round-to-nearest 4-bit g64 (no calibration)"),
    ("magnitude-50%+rtn-w4-g64-head4", [MagnitudeConfig(sparsity=0.5), RTNConfig(**_W4G64, lm_head=True)],
     "magnitude 50%, then round-to-nearest 4-bit g64 with the output head too"),
    # layer dropping
    ("drop-20%-layers", [LayerDropConfig(fraction=0.2)], "drop the 20% of decoder layers that turn the stream least"),
    ("drop-20%-layers-block-influence", [LayerDropConfig(fraction=0.2, score="block_influence")],
     "drop the 20% of decoder layers with the lowest block influence (ShortGPT)"),
]:
    register_preset(_name, _steps, _description)
del _name, _steps, _description
