"""After compression: replace each compressed linear by its packed runtime module and record the
``quantization_config`` that lets ``from_pretrained`` load the saved folder."""

from __future__ import annotations

import torch
from torch import nn

from ..formats import LinearFormat
from ..integrations import attach_quantization_config
from ..methods.masks import SparsityPattern, parse_sparsity
from ..methods.quant_grid import QuantizedWeight
from ..nn import has_packed_layers, pack_module
from .blocks import linear_weight
from .state import CompressionResult

__all__ = ["has_packed_layers", "pack_linear_module", "pack_model", "sparsity_pattern"]


@torch.no_grad()
def pack_model(model: nn.Module, result: CompressionResult) -> dict[str, LinearFormat]:
    """Packs every linear that ``result`` quantized or pruned (in place) and attaches the quantization config.

    Returns the format of each packed layer by qualified name. A model without quantized or pruned layers (e.g.
    only layer dropping) is left as a plain transformers model.
    """
    pattern = sparsity_pattern(result.recipe)
    formats = {name: pack_linear_module(model, name, result.quantized.get(name), result.masks.get(name), pattern)
               for name in sorted(set(result.masks) | set(result.quantized))}
    if formats:
        dropped = sorted(i for r in result.reports for i in r.dropped_layers)
        attach_quantization_config(model, formats, recipe=getattr(model.config, "compression_recipe", None),
                                   dropped_layers=dropped)
    return formats


def sparsity_pattern(recipe) -> SparsityPattern | None:
    """The recipe's pruning pattern (N:M or unstructured), or `None` if it prunes nothing."""
    prune_step = next((s for s in recipe.steps if s.prunes), None)
    return parse_sparsity(prune_step.sparsity) if prune_step is not None else None


@torch.no_grad()
def pack_linear_module(model: nn.Module, name: str, qw: QuantizedWeight | None, pruned: torch.Tensor | None,
                       pattern: SparsityPattern | None) -> LinearFormat:
    """Replaces the linear ``name`` of ``model`` by its packed runtime module (grid ``qw``, pruning mask ``pruned``:
    True = pruned) and returns its format."""
    module = model.get_submodule(name)
    weight = linear_weight(module)  # (out, in)
    out_features, in_features = weight.shape
    sparsity = None
    if pruned is not None:
        sparsity = str(pattern) if pattern is not None and pattern.is_nm else "bitmask"
    fmt = LinearFormat(
        in_features, out_features, bias=getattr(module, "bias", None) is not None,
        bits=qw.bits if qw else None, group_size=qw.group_size if qw else -1,
        symmetric=qw.symmetric if qw else False, sparsity=sparsity,
        nnz=int((~pruned).sum()) if sparsity == "bitmask" else None,
        act_order=bool(qw is not None and qw.perm is not None),
    )
    parts = {"pruned": pruned, "float_dtype": weight.dtype, "name": name}
    if qw is not None:
        parts.update(codes=qw.codes, scale=qw.scale, zero=qw.zero)
    model.set_submodule(name, pack_module(fmt, weight, getattr(module, "bias", None), **parts))
    return fmt
