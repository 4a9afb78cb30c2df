"""Pure tensor conversions between a compressed layer's parts (codes, grid, mask) and its stored tensors
(:class:`~.schema.LinearFormat`), and back to the dense weight. No modules, no I/O."""

from __future__ import annotations

import torch

from ..errors import UserInputError
from ..validation import static_group_index
from .bitpack import as_words, from_words, pack_bits, unpack_bits
from .schema import LinearFormat

__all__ = ["group_index", "pack_linear", "static_group_index", "unpack_codes", "unpack_linear"]


def group_index(fmt: LinearFormat, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The group of each input column, shape `(in,)`: the stored ``weight_g_idx`` when ``fmt.g_idx``, else
    :func:`static_group_index`."""
    if fmt.g_idx:
        return tensors["weight_g_idx"].long()
    return static_group_index(fmt.in_features, fmt.effective_group_size)


def _nm_kept_index(kept: torch.Tensor, n: int, m: int, name: str) -> torch.Tensor:
    """Positions (ascending) of the kept entries in each run of ``m``; shape `(out, runs, n)`."""
    runs = kept.reshape(kept.shape[0], -1, m)  # (out, runs, m)
    counts = runs.sum(-1)
    if not bool((counts <= n).all()):
        raise UserInputError(f"{name}: the weight keeps more than {n} of {m} in some run; it is not {n}:{m} sparse")
    # Pad runs that keep fewer than n (all-zero weights) with pruned positions: they store a zero value.
    order = torch.argsort((~runs).to(torch.int8), dim=-1, stable=True)  # kept positions first, each ascending
    return order[..., :n].sort(dim=-1).values


def pack_linear(
    fmt: LinearFormat,
    weight: torch.Tensor,
    *,
    codes: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    pruned: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    float_dtype: torch.dtype | None = None,
    name: str = "layer",
) -> dict[str, torch.Tensor]:
    """The stored tensors of a layer.

    Args:
        weight (`torch.Tensor` `(out, in)`): the dense (fake-quantized / zeroed) weight; for float sparse layers the
            kept values come from here.
        codes (`torch.Tensor` `(out, in)`, *optional*), scale, zero (`(out, groups)`): the integer grid, when quantized.
        pruned (`torch.BoolTensor` `(out, in)`, *optional*): True where pruned, when sparse.
        g_idx (`torch.Tensor` `(in,)`, *optional*): only when ``fmt.g_idx``.
    """
    float_dtype = float_dtype or weight.dtype
    out, cols = fmt.out_features, fmt.in_features
    if tuple(weight.shape) != (out, cols):
        raise UserInputError(f"{name}: weight shape {tuple(weight.shape)} does not match the format's {(out, cols)}")
    kept = None if fmt.sparsity is None else (~pruned if pruned is not None else weight != 0)
    tensors: dict[str, torch.Tensor] = {}
    if fmt.bits:
        if codes is None or scale is None or zero is None:
            raise UserInputError(f"{name}: a {fmt.bits}-bit format needs codes, scale and zero")
        codes = codes.to(torch.uint8)
        tensors["weight_scale"] = scale.to(float_dtype).reshape(out, fmt.groups).contiguous()
        tensors["weight_zero"] = zero.round().to(torch.uint8).reshape(out, fmt.groups).contiguous()
        if fmt.g_idx:
            tensors["weight_g_idx"] = g_idx.to(torch.int32).contiguous()
    if fmt.kind == "int":
        tensors["weight"] = as_words(pack_bits(codes, fmt.bits))  # (out, words)
    elif fmt.kind == "nm":
        n, m = fmt.nm
        index = _nm_kept_index(kept, n, m, name)  # (out, runs, n)
        source = codes if fmt.bits else weight
        values = torch.gather(source.reshape(out, -1, m), -1, index).reshape(out, -1)  # (out, runs * n)
        tensors["weight"] = as_words(pack_bits(values, fmt.bits)) if fmt.bits else values.to(float_dtype).contiguous()
        tensors["weight_index"] = as_words(pack_bits(index.reshape(out, -1), fmt.index_bits))
    else:
        nnz = int(kept.sum())
        if nnz != fmt.nnz:
            raise UserInputError(f"{name}: the mask keeps {nnz} weights but the format says nnz={fmt.nnz}")
        values = (codes if fmt.bits else weight)[kept]  # (nnz,) row-major
        tensors["weight"] = as_words(pack_bits(values, fmt.bits)) if fmt.bits else values.to(float_dtype).contiguous()
        tensors["weight_mask"] = as_words(pack_bits(kept.to(torch.uint8), 1))
    if fmt.bias:
        tensors["bias"] = bias.to(float_dtype).contiguous()
    return tensors


def _kept_and_values(fmt: LinearFormat, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """For sparse layers: the kept mask `(out, in)` and the payload scattered to `(out, in)` (codes or floats)."""
    out, cols = fmt.out_features, fmt.in_features
    payload = t["weight"]
    if fmt.kind == "nm":
        n, m = fmt.nm
        kept_per_row = cols // m * n
        index = unpack_bits(from_words(t["weight_index"]), fmt.index_bits, kept_per_row).long().reshape(out, -1, n)
        values = unpack_bits(from_words(payload), fmt.bits, kept_per_row) if fmt.bits else payload
        dense = torch.zeros(out, cols // m, m, dtype=values.dtype, device=values.device)
        dense.scatter_(-1, index, values.reshape(out, -1, n))  # (out, runs, m)
        kept = torch.zeros(out, cols // m, m, dtype=torch.bool, device=values.device).scatter_(-1, index, True)
        return kept.reshape(out, cols), dense.reshape(out, cols)
    kept = unpack_bits(from_words(t["weight_mask"]), 1, cols).bool()  # (out, in)
    values = unpack_bits(from_words(payload), fmt.bits, fmt.nnz) if fmt.bits else payload
    dense = torch.zeros(out, cols, dtype=values.dtype, device=values.device)
    dense[kept] = values
    return kept, dense


def unpack_codes(fmt: LinearFormat, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Integer codes `(out, in)` of a quantized dense layer."""
    return unpack_bits(from_words(tensors["weight"]), fmt.bits, fmt.in_features)


def unpack_linear(fmt: LinearFormat, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight `(out, in)` the stored tensors represent (in ``dtype``, default the scale/value dtype)."""
    if fmt.kind == "int":
        kept, values = None, unpack_codes(fmt, tensors)
    else:
        kept, values = _kept_and_values(fmt, tensors)
    if fmt.bits:
        scale = tensors["weight_scale"]
        g = group_index(fmt, tensors).to(scale.device)
        weight = scale.float()[:, g] * (values.float() - tensors["weight_zero"].float()[:, g])  # (out, in)
        if kept is not None:
            weight = weight * kept
        dtype = dtype or scale.dtype
    else:
        weight, dtype = values, dtype or values.dtype
    return weight.to(dtype)
