"""compressed-tensors checkpoints out and in (the layout: :mod:`hf_compress_prompt.formats.compressed_tensors`).

- :func:`export_compressed_tensors` writes a compressed model as ``pack-quantized``, so stock transformers (with the
  ``compressed-tensors`` package, without this one) and vLLM load it; the recovery prompt goes along in
  ``recovery_prompt/`` (PEFT format).
- :func:`install_ct_modules` / :func:`repack_ct_modules` open a ``pack-quantized`` checkpoint into this package's
  packed modules and kernels without decompressing it (the transformers quantizer calls them, as for GPTQ
  checkpoints); :func:`check_ct_config` names what this package does not run.

Plain ``AutoModelForCausalLM.from_pretrained`` keeps transformers' own compressed-tensors handler (which decompresses
to full precision on the first forward); :func:`hf_compress_prompt.from_pretrained` routes ``pack-quantized`` folders
here. Taking over the ``"compressed-tensors"`` method for every caller would also take the formats this package
does not run (FP8, NVFP4, activation quantization) away from transformers, so it is not done.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .._logging import get_logger
from ..errors import UserInputError
from ..formats import LinearFormat
from ..formats.compressed_tensors import (
    CT_FORMAT,
    CT_TESTED_VERSION,
    MASKS_FILE,
    SPARSITY_KEY,
    ct_quantization_config,
    ct_weight_args,
    export_refusal,
    read_ct_layer,
    write_ct_layer,
)
from ..formats.saved_folder import PROMPT_SUBFOLDER, atomic_directory
from ..nn import PackedLinear, packed_linear_from
from ..recovery import io as prompt_io
from ..recovery.runtime import recovery_prompt_of
from .safetensors_check import CheckpointError, checkpoint_location

__all__ = [
    "CTImportLinear",
    "check_ct_config",
    "ct_layer_schemes",
    "export_compressed_tensors",
    "install_ct_modules",
    "repack_ct_modules",
]

logger = get_logger(__name__)

_NATIVE = ("load it with transformers' own compressed-tensors support instead: AutoModelForCausalLM.from_pretrained("
           "path) without hf_compress_prompt.from_pretrained (pip install compressed-tensors)")


# ----- export ---------------------------------------------------------------------------------------------------
def _is_symmetric(fmt: LinearFormat, zero: torch.Tensor) -> bool:
    """A layer is written symmetric (no zero points) when its recipe was and every zero point is the midpoint."""
    return fmt.symmetric and bool((zero == 2 ** (fmt.bits - 1)).all())


def _tied_targets(model: nn.Module) -> set[str]:
    """State-dict keys that are tied to another key (transformers re-ties them on load: ``lm_head.weight``)."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(text_config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, dict) else set()


def _version() -> str:
    try:
        from compressed_tensors import __version__  # only recorded, never needed

        return str(__version__)
    except ImportError:
        return CT_TESTED_VERSION


def export_compressed_tensors(model: nn.Module, save_directory: str | os.PathLike, tokenizer=None, *,
                              overwrite: bool = False, max_shard_size: int | str = "5GB") -> Path:
    """Writes ``model`` (compressed by this package, or loaded from a folder it saved) as a compressed-tensors
    ``pack-quantized`` checkpoint.

    Args:
        model (`PreTrainedModel`): a model whose compressed layers hold integer codes (2, 3, 4 or 8 bits; per channel
            or in groups; symmetric or not; act-order with static groups; sparse + int layers are written as plain
            int layers, numerically the same, with their masks in this package's own file).
        save_directory (`str` or `os.PathLike`): the folder to create; the trust rules of
            :func:`~hf_compress_prompt.formats.saved_folder.check_save_target` apply (``overwrite`` replaces an
            earlier save whole, atomically).
        tokenizer (*optional*): saved beside the weights.
        max_shard_size (`int` or `str`, defaults to ``"5GB"``): shard the weights as ``save_pretrained`` does.

    Raises:
        UserInputError: the model has no compressed layer, a layer the format cannot express (float sparse values,
            a per-column group index), or a structurally pruned architecture (``pruned_llama``) that stock
            transformers cannot build; one line naming the first such layer and why.
    """
    from huggingface_hub import save_torch_state_dict

    if getattr(model.config, "model_type", None) == "pruned_llama":
        raise UserInputError("this model's layers have per-layer widths left by structured pruning (model type "
                             "'pruned_llama'), which stock transformers and vLLM cannot build; export is refused: "
                             "save it with hf_compress_prompt.save_pretrained")
    packed = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    if not packed:
        raise UserInputError("the model has no compressed layer, so there is nothing for compressed-tensors to "
                             "describe; compress it first, or save it with save_pretrained")
    for name, module in packed.items():
        reason = export_refusal(module.fmt, module.stored_tensors().get("weight_zero"))
        if reason:
            others = sum(export_refusal(m.fmt, m.stored_tensors().get("weight_zero")) is not None for m in packed.values())
            more = f" (and {others - 1} more layers)" if others > 1 else ""
            raise UserInputError(f"cannot export as compressed-tensors: layer {name!r} ({module.fmt.describe()}){more}: "
                                 f"{reason}")

    state: dict[str, torch.Tensor] = {}
    tied = _tied_targets(model)
    for key, tensor in model.state_dict().items():
        if key.rpartition(".")[0] not in packed and key not in tied:
            state[key] = tensor.detach().cpu()
    schemes: dict[str, list[str]] = {}  # scheme JSON -> module names
    sparsity: dict[str, str] = {}
    masks: dict[str, torch.Tensor] = {}
    for name, module in packed.items():
        fmt, stored = module.fmt, {k: v.detach().cpu() for k, v in module.stored_tensors().items()}
        symmetric = _is_symmetric(fmt, stored["weight_zero"])
        ct, mask = write_ct_layer(fmt, stored, symmetric, name=name)
        state.update({f"{name}.{k}": v for k, v in ct.items()})
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().cpu()
        if mask is not None:
            sparsity[name], masks[f"{name}.weight_mask"] = fmt.sparsity, mask
        schemes.setdefault(json.dumps(ct_weight_args(fmt, symmetric), sort_keys=True), []).append(name)

    dense_linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    if len(schemes) == 1:  # one scheme for every linear but the ignored ones, as llm-compressor writes it
        groups = [(json.loads(next(iter(schemes))), ["Linear"])]
    else:
        groups = [(json.loads(s), sorted(names)) for s, names in sorted(schemes.items(), key=lambda kv: min(kv[1]))]
    quant = ct_quantization_config(groups, dense_linears, _version())

    config = copy.deepcopy(model.config)
    config.quantization_config = quant
    if sparsity:
        setattr(config, SPARSITY_KEY, dict(sorted(sparsity.items())))
    elif hasattr(config, SPARSITY_KEY):
        delattr(config, SPARSITY_KEY)
    with atomic_directory(save_directory, overwrite=overwrite) as tmp:
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and model.can_generate():
            generation_config.save_pretrained(tmp)
        if masks:
            from safetensors.torch import save_file

            (tmp / MASKS_FILE).parent.mkdir()
            save_file({k: v.contiguous() for k, v in masks.items()}, str(tmp / MASKS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        prompt = recovery_prompt_of(model)
        if prompt is not None:
            prompt_io.write_recovery_prompt(prompt, tmp / PROMPT_SUBFOLDER, model)
    logger.info("exported %d compressed layers (%d scheme%s) as compressed-tensors %s to %s", len(packed),
                len(groups), "" if len(groups) == 1 else "s", CT_FORMAT, save_directory)
    return Path(save_directory).expanduser().resolve()


# ----- import ---------------------------------------------------------------------------------------------------
def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(version))[:2])


def check_ct_config(quant: dict, where: str = "config.json") -> None:
    """Refuses, in one line naming it, a compressed-tensors ``quantization_config`` this package does not run:
    a format other than ``pack-quantized``, activation quantization, float or block weights, bits other than 2, 3,
    4, 8, or a version newer than the one tested (:data:`CT_TESTED_VERSION`)."""
    version = quant.get("version")
    if version and _version_tuple(version) > _version_tuple(CT_TESTED_VERSION):
        raise UserInputError(f"{where}: compressed-tensors version {version} is newer than the {CT_TESTED_VERSION} this "
                             f"package was tested with; {_NATIVE}")
    if quant.get("kv_cache_scheme"):
        raise UserInputError(f"{where}: the checkpoint quantizes the KV cache (kv_cache_scheme), which this package "
                             f"does not run; {_NATIVE}")
    groups = quant.get("config_groups") or {}
    if not groups:
        raise UserInputError(f"{where}: the compressed-tensors config has no config_groups; {_NATIVE}")
    for group_name, scheme in groups.items():
        if not isinstance(scheme, dict):
            raise UserInputError(f"{where}: config group {group_name!r} names a preset scheme ({scheme!r}); {_NATIVE}")
        fmt = scheme.get("format") or quant.get("format")
        if fmt != CT_FORMAT:
            raise UserInputError(f"{where}: config group {group_name!r} has format {fmt!r}; this package runs "
                                 f"{CT_FORMAT!r} only; {_NATIVE}")
        for side in ("input_activations", "output_activations"):
            if scheme.get(side):
                raise UserInputError(f"{where}: config group {group_name!r} quantizes {side} (W{scheme['weights'].get('num_bits')}"
                                     f"A{scheme[side].get('num_bits')}); this package runs weight-only int schemes; {_NATIVE}")
        weights = scheme.get("weights") or {}
        if weights.get("type", "int") != "int" or weights.get("num_bits") not in (2, 3, 4, 8):
            raise UserInputError(f"{where}: config group {group_name!r} has {weights.get('type')} {weights.get('num_bits')}-bit"
                                 f" weights; this package runs int 2, 3, 4 and 8 bits; {_NATIVE}")
        if weights.get("strategy") not in (None, "channel", "group", "tensor") or weights.get("dynamic"):
            raise UserInputError(f"{where}: config group {group_name!r} uses strategy {weights.get('strategy')!r}"
                                 f"{' (dynamic)' if weights.get('dynamic') else ''}; this package runs channel, group "
                                 f"and tensor scales; {_NATIVE}")
    if quant.get("transform_config"):
        raise UserInputError(f"{where}: the checkpoint has a transform_config (rotations); {_NATIVE}")


def _matches(name: str, module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target or any(cls.__name__ == target for cls in type(module).__mro__)


def ct_layer_schemes(model: nn.Module, quant: dict) -> dict[str, dict]:
    """Module name -> the ``weights`` args of its config group, for every module the config targets and does not
    ignore (compressed-tensors' matching: exact names, ``re:`` patterns or class names; the first group wins)."""
    ignore = quant.get("ignore") or []
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(_matches(name, module, t) for t in ignore):
            continue
        for scheme in (quant.get("config_groups") or {}).values():
            if any(_matches(name, module, t) for t in scheme.get("targets") or []):
                out[name] = scheme["weights"]
                break
    return out


class CTImportLinear(nn.Module):
    """Holds one layer's ``pack-quantized`` tensors until :func:`repack_ct_modules` replaces it; it has no forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weights: dict, found: dict[str, dict],
                 name: str, dtype: torch.dtype, device="meta"):
        super().__init__()
        self.in_features, self.out_features, self.weights, self.float_dtype = in_features, out_features, weights, dtype
        for tensor in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"):
            info = found.get(f"{name}.{tensor}")
            if info is not None:
                stored = getattr(torch, info["dtype"].lower(), None) if tensor != "weight_scale" else dtype
                self.register_buffer(tensor, torch.empty(tuple(info["shape"]), dtype=stored, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    def forward(self, x):
        raise RuntimeError("CTImportLinear is a loading placeholder; load through hf_compress_prompt.from_pretrained")


def install_ct_modules(model: nn.Module, quant: dict, found: dict[str, dict] | None, dtype: torch.dtype) -> None:
    """Replaces every targeted linear with a placeholder that receives its ``pack-quantized`` tensors."""
    if found is None:
        raise CheckpointError("loading a compressed-tensors checkpoint needs its safetensors files")
    layers = ct_layer_schemes(model, quant)
    if not layers:
        raise CheckpointError("the compressed-tensors config targets no linear layer of this model")
    for name, weights in layers.items():
        module = model.get_submodule(name)
        needed = ["weight_packed", "weight_scale"] + ([] if weights.get("symmetric", True) else ["weight_zero_point"])
        for tensor in needed:
            if f"{name}.{tensor}" not in found:
                raise CheckpointError(f"compressed-tensors checkpoint {checkpoint_location(found)} is missing tensor "
                                      f"{name}.{tensor!s}, which its config's scheme for {name!r} needs; the folder is "
                                      "incomplete")
        model.set_submodule(name, CTImportLinear(module.in_features, module.out_features, f"{name}.bias" in found,
                                                 weights, found, name, dtype))


@torch.no_grad()
def repack_ct_modules(model: nn.Module, sparsity: dict[str, str] | None = None,
                      masks: dict[str, torch.Tensor] | None = None) -> dict[str, LinearFormat]:
    """Replaces every loaded :class:`CTImportLinear` with this package's packed module; returns the formats."""
    formats = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, CTImportLinear):
            continue
        tensors = {k: b for k, b in module.named_buffers(recurse=False)}
        kind = (sparsity or {}).get(name)
        fmt, stored = read_ct_layer(module.weights, tensors, module.in_features, module.out_features, bias=module.bias,
                                    sparsity=kind, mask=(masks or {}).get(f"{name}.weight_mask"), name=name)
        model.set_submodule(name, packed_linear_from(fmt, stored))
        formats[name] = fmt
    return formats
