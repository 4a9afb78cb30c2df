"""The compressed-tensors ``pack-quantized`` layout (llm-compressor's format, loaded natively by transformers and
served by vLLM), converted to and from this package's integer grid (:mod:`.schema`). Pure tensor conversions and
config dicts: no modules, no I/O, and no import of the ``compressed-tensors`` library (the tests check what is
written here against its own pydantic models and decompressor).

Per quantized linear (``in`` inputs, ``out`` outputs, ``G`` groups; source: compressed-tensors 0.20
``compressors/pack_quantized``):

- ``weight_packed`` int32 `(out, ceil(in * bits / 32))`: each row's codes as one dense little-endian bit stream
  (codes straddle word boundaries), each code stored as ``q + 2**(bits-1)`` for the signed integer ``q``. That is
  exactly our unsigned code in our own bit stream (:mod:`.bitpack`), so the words are the same for every width.
- ``weight_scale`` float `(out, G)` (`(out, 1)` per channel); ``weight_shape`` int64 ``[out, in]``.
- ``weight_zero_point`` int32 `(ceil(out * bits / 32), G)`, asymmetric only: the signed zero points packed the
  same way along the output dimension. Symmetric schemes store none (the zero point is 0, our ``2**(bits-1)``).
- ``weight_g_idx`` int32 `(in,)`: written by compressed-tensors < 0.15 for ``actorder: "group"`` (since removed);
  read here, never written.

A weight reads back as ``(q - zp) * scale = (code - zero) * scale``: our dequantization, with the same rounding.
Sparse layers with integer codes are written as plain ``pack-quantized`` (a pruned weight is the code at the zero
point, so it decompresses to exactly 0); which layers were sparse and their keep masks are this package's own
metadata (:data:`SPARSITY_KEY`, :data:`MASKS_FILE`), outside ``QuantizationArgs`` (its models forbid extra keys).
"""

from __future__ import annotations

import torch

from ..errors import UserInputError
from ..validation import static_group_index
from .bitpack import as_words, from_words, pack_bits, packed_bytes, unpack_bits
from .packing import _kept_and_values, group_index, pack_linear, unpack_codes
from .saved_folder import METADATA_SUBFOLDER, SPARSITY_MASKS
from .schema import LinearFormat

__all__ = [
    "CT_FORMAT",
    "CT_QUANT_METHOD",
    "CT_TESTED_VERSION",
    "MASKS_FILE",
    "SPARSITY_KEY",
    "ct_quantization_config",
    "ct_weight_args",
    "export_refusal",
    "read_ct_layer",
    "write_ct_layer",
]

CT_QUANT_METHOD = "compressed-tensors"
CT_FORMAT = "pack-quantized"
CT_TESTED_VERSION = "0.20.1"  # the compressed-tensors release the layout above was read from and tested against
SPARSITY_KEY = "hf_compress_prompt_sparsity"  # config.json: {layer: "2:4" | "bitmask"} for sparse + int layers
MASKS_FILE = f"{METADATA_SUBFOLDER}/{SPARSITY_MASKS}"  # <layer>.weight_mask (1 bit per weight, 1 = kept)
CT_TENSOR_NAMES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def export_refusal(fmt: LinearFormat, zero: torch.Tensor | None = None) -> str | None:
    """Why a layer of format ``fmt`` cannot be written as ``pack-quantized`` (``None`` when it can)."""
    if not fmt.bits:
        return (f"{fmt.describe()} keeps float values; compressed-tensors 0.15+ has no sparse float format (its 2:4 "
                "and bitmask compressors were removed): quantize it too (a joint sparse + int recipe), or save it with "
                "save_pretrained")
    if fmt.g_idx:
        return ("its columns use a group index (act-order without static groups, e.g. an imported GPTQ layer); "
                "compressed-tensors removed actorder 'group' in 0.15, so only static groups can be written")
    if zero is not None and bool(((zero < 0) | (zero > 2**fmt.bits - 1)).any()):
        return f"a zero point lies outside the {fmt.bits}-bit code range"
    return None


def ct_weight_args(fmt: LinearFormat, symmetric: bool) -> dict:
    """The ``weights`` ``QuantizationArgs`` of a layer (as the dict compressed-tensors serializes)."""
    args = {
        "num_bits": fmt.bits,
        "type": "int",
        "symmetric": symmetric,
        "group_size": None if fmt.group_size == -1 else fmt.group_size,
        "strategy": "channel" if fmt.group_size == -1 else "group",
        "block_structure": None,
        "dynamic": False,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    if fmt.act_order:
        args["actorder"] = "weight"  # columns visited by activation order, groups static: no g_idx
    return args


def ct_quantization_config(groups: list[tuple[dict, list[str]]], ignore: list[str], version: str) -> dict:
    """``quantization_config`` of ``config.json``: one config group per distinct weights scheme (its
    ``QuantizationArgs`` dict and the module names or class names it targets)."""
    config_groups = {}
    for i, (weights, targets) in enumerate(groups):
        config_groups[f"group_{i}"] = {
            "targets": list(targets),
            "weights": weights,
            "input_activations": None,
            "output_activations": None,
            "format": CT_FORMAT,
        }
    return {
        "quant_method": CT_QUANT_METHOD,
        "format": CT_FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": version,
    }


def _full_codes(fmt: LinearFormat, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes `(out, in)` of every weight (a pruned weight gets its group's zero point) and the keep mask (sparse)."""
    if fmt.kind == "int":
        return unpack_codes(fmt, tensors), None
    kept, codes = _kept_and_values(fmt, tensors)  # codes are 0 where pruned
    zero = tensors["weight_zero"][:, group_index(fmt, tensors).to(kept.device)]  # (out, in)
    return torch.where(kept, codes, zero), kept


def write_ct_layer(fmt: LinearFormat, tensors: dict[str, torch.Tensor], symmetric: bool,
                   name: str = "layer") -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The ``pack-quantized`` tensors of one stored layer (our :func:`~.packing.pack_linear` output) and, for a sparse
    layer, its keep mask packed 1 bit per weight (int32 words `(out, ceil(in / 32))`).

    ``symmetric``: every zero point is ``2**(bits-1)`` (checked), so no ``weight_zero_point`` is written."""
    reason = export_refusal(fmt, tensors.get("weight_zero"))
    if reason:
        raise UserInputError(f"{name} ({fmt.describe()}) cannot be exported as compressed-tensors: {reason}")
    bits, out = fmt.bits, fmt.out_features
    zero = tensors["weight_zero"]  # (out, G) uint8 in [0, 2**bits)
    if symmetric and not bool((zero == 2 ** (bits - 1)).all()):
        raise UserInputError(f"{name}: symmetric export needs every zero point at {2 ** (bits - 1)}")
    if fmt.kind == "int":
        packed, mask = tensors["weight"], None  # our words are already compressed-tensors' (module docstring)
    else:
        codes, kept = _full_codes(fmt, tensors)
        packed, mask = as_words(pack_bits(codes, bits)), as_words(pack_bits(kept.to(torch.uint8), 1))
    ct = {
        "weight_packed": packed.contiguous(),  # (out, ceil(in * bits / 32))
        "weight_scale": tensors["weight_scale"].contiguous(),  # (out, G)
        "weight_shape": torch.tensor([out, fmt.in_features], dtype=torch.int64),
    }
    if not symmetric:
        ct["weight_zero_point"] = as_words(pack_bits(zero.t(), bits)).t().contiguous()  # (ceil(out*bits/32), G)
    return ct, mask


def read_ct_layer(weights: dict, tensors: dict[str, torch.Tensor], in_features: int, out_features: int, *,
                  bias: torch.Tensor | None = None, sparsity: str | None = None, mask: torch.Tensor | None = None,
                  name: str = "layer") -> tuple[LinearFormat, dict[str, torch.Tensor]]:
    """Our format and stored tensors (:func:`~.packing.pack_linear` layout) for one ``pack-quantized`` layer.

    Args:
        weights (`dict`): the scheme's ``weights`` ``QuantizationArgs`` (int, 1-8 bits; ``channel``, ``group`` or
            ``tensor`` strategy).
        tensors: the layer's ``weight_packed``, ``weight_scale`` and, when present, ``weight_zero_point`` and
            ``weight_g_idx``.
        sparsity, mask: a sparse layer exported by this package (:data:`SPARSITY_KEY`, :data:`MASKS_FILE`).
    """
    bits = weights.get("num_bits")
    strategy = weights.get("strategy") or ("channel" if weights.get("group_size") == -1 else
                                           "group" if weights.get("group_size") else "tensor")
    symmetric = bool(weights.get("symmetric", True))
    if bits not in (2, 3, 4, 8):
        raise UserInputError(f"{name}: compressed-tensors num_bits={bits} is not one this package runs (2, 3, 4, 8)")
    words = packed_bytes(in_features, bits) // 4
    packed = tensors["weight_packed"]
    if tuple(packed.shape) != (out_features, words) or packed.dtype != torch.int32:
        raise UserInputError(f"{name}: weight_packed is {tuple(packed.shape)} {packed.dtype}, a {out_features}x"
                             f"{in_features} int{bits} layer needs ({out_features}, {words}) int32")
    scale = tensors["weight_scale"]
    if strategy == "tensor":  # one scale for the whole weight: the same scale on every row
        scale = scale.reshape(1, 1).expand(out_features, 1)
        strategy = "channel"
    group_size = -1 if strategy == "channel" else int(weights.get("group_size") or 0)
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    if strategy not in ("channel", "group") or tuple(scale.shape) != (out_features, groups):
        raise UserInputError(f"{name}: weight_scale {tuple(scale.shape)} does not fit strategy {strategy!r} with "
                             f"group_size {weights.get('group_size')}")
    if symmetric:
        zero = torch.full((out_features, groups), 2 ** (bits - 1), dtype=torch.uint8, device=packed.device)
    else:
        zp = tensors.get("weight_zero_point")
        if zp is None:
            raise UserInputError(f"{name}: an asymmetric scheme needs weight_zero_point")
        if zp.dtype == torch.int32 and tuple(zp.shape) == (packed_bytes(out_features, bits) // 4, groups):
            zero = unpack_bits(from_words(zp.t()), bits, out_features).t()  # (out, G), stored zp + 2**(bits-1)
        elif tuple(zp.shape) == (out_features, groups):  # unpacked (int8 signed) zero points
            zero = (zp.to(torch.int32) + 2 ** (bits - 1)).to(torch.uint8)
        else:
            raise UserInputError(f"{name}: weight_zero_point {tuple(zp.shape)} {zp.dtype} does not fit the layer")
    g_idx = tensors.get("weight_g_idx")
    trivial = g_idx is None or torch.equal(g_idx.long().cpu(), static_group_index(in_features, group_size if
                                                                                     group_size != -1 else in_features))
    kwargs = {"bias": bias is not None, "bits": bits, "group_size": group_size, "symmetric": symmetric,
              "g_idx": not trivial, "act_order": weights.get("actorder") in ("weight", "static", "group", True)}
    if sparsity is None:  # the words are already ours: no repacking
        fmt = LinearFormat(in_features, out_features, **kwargs)
        stored = {"weight": packed.contiguous(), "weight_scale": scale.contiguous(), "weight_zero": zero.contiguous()}
        if fmt.g_idx:
            stored["weight_g_idx"] = g_idx.to(torch.int32).contiguous()
        if bias is not None:
            stored["bias"] = bias.to(scale.dtype).contiguous()
        return fmt, stored
    codes = unpack_bits(from_words(packed), bits, in_features)  # (out, in)
    if sparsity is not None:
        if mask is None:
            raise UserInputError(f"{name}: sparse layer without its mask in {MASKS_FILE}")
        kept = unpack_bits(from_words(mask), 1, in_features).bool()
        fmt = LinearFormat(in_features, out_features, sparsity=sparsity,
                           nnz=int(kept.sum()) if sparsity == "bitmask" else None, **kwargs)
    stored = pack_linear(fmt, torch.empty(out_features, in_features, device="meta"), codes=codes, scale=scale,
                         zero=zero, pruned=None if kept is None else ~kept, g_idx=g_idx, bias=bias,
                         float_dtype=scale.dtype, name=name)
    return fmt, stored
