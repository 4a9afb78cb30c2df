"""The ``hf_compress_prompt`` quantization method for transformers: a :class:`CompressedConfig` recorded in
``config.json`` and a :class:`CompressedHfQuantizer` that swaps the compressed layers in on the meta device before
the weights load, so ``AutoModelForCausalLM.from_pretrained(dir)`` returns the packed model.

Both are registered with transformers when ``hf_compress_prompt`` is imported (:func:`register`, idempotent).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._logging import get_logger
from ..errors import UserInputError
from ..formats import FORMAT_VERSION, LinearFormat
from ..formats.compressed_tensors import MASKS_FILE
from ..nn import PackedLinear, packed_linear_class, use_growing_cache
from ..recovery import PROMPT_SUBFOLDER, add_recovery_methods, attach_recovery_prompt
from .compressed_tensors import CTImportLinear, check_ct_config, install_ct_modules, repack_ct_modules
from .gptq_import import GPTQImportLinear, install_gptq_modules, repack_gptq_modules
from .safetensors_check import CheckpointError, check_folder, check_tensors, checkpoint_location, checkpoint_tensors

__all__ = [
    "QUANT_METHOD",
    "CompressedConfig",
    "CompressedHfQuantizer",
    "attach_quantization_config",
    "install_packed_modules",
    "register",
]

logger = get_logger(__name__)

QUANT_METHOD = "hf_compress_prompt"
CHECKPOINT_FORMATS = ("native", "gptq", "compressed-tensors")


class CompressedConfig(QuantizationConfigMixin):
    """What a compressed checkpoint holds, recorded under ``quantization_config`` in ``config.json``.

    Args:
        layers (`dict[str, dict]`): qualified module name -> its :class:`~hf_compress_prompt.formats.LinearFormat`
            as a dict (bits, group size, symmetry, act-order, sparsity kind and kept count).
        format_version (`int`): the on-disk format version; a version this package does not know is an error.
        checkpoint_format (`str`, defaults to ``"native"``): ``"native"`` (this package's layout), ``"gptq"``
            (an AutoGPTQ/GPTQModel/optimum checkpoint) or ``"compressed-tensors"`` (``pack-quantized``, as
            llm-compressor writes it), the last two repacked at load time.
        recipe (`dict`, *optional*): the compression recipe (steps and calibration) that produced the weights.
        dropped_layers (`list[int]`, *optional*): decoder layers removed by layer dropping (original indices).
        modules_to_not_convert (`list[str]`, *optional*): modules kept in floating point (e.g. ``lm_head``).
        gptq (`dict`, *optional*): the original GPTQ quantization config, for ``checkpoint_format="gptq"``.
        compressed_tensors (`dict`, *optional*): the original compressed-tensors quantization config (and, under
            ``"sparsity"``, this package's record of sparse layers), for ``checkpoint_format="compressed-tensors"``.
    """

    def __init__(
        self,
        layers: dict[str, dict] | None = None,
        format_version: int = FORMAT_VERSION,
        checkpoint_format: str = "native",
        recipe: dict | None = None,
        dropped_layers: list[int] | None = None,
        modules_to_not_convert: list[str] | None = None,
        gptq: dict | None = None,
        compressed_tensors: dict | None = None,
        **kwargs,
    ):
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.checkpoint_format = checkpoint_format
        self.layers = dict(layers or {})
        self.recipe = recipe
        self.dropped_layers = list(dropped_layers or [])
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.gptq = gptq
        self.compressed_tensors = compressed_tensors
        if kwargs:
            logger.warning("ignoring unknown quantization_config keys %s", sorted(kwargs))
        self.post_init()

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        """The config read back from ``config.json``: unlike a config built in memory, it must say its
        ``format_version`` (a folder without one was not written by this package, or was edited)."""
        if not isinstance(config_dict, dict):
            raise UserInputError(f"config.json: quantization_config is a {type(config_dict).__name__}, not an object; "
                                 "save the model again")
        if "format_version" not in config_dict:
            raise UserInputError(
                f"config.json: quantization_config (quant_method {QUANT_METHOD!r}) has no format_version; the folder "
                f"was edited or not written by hf_compress_prompt: save the model again (or add \"format_version\": "
                f"{FORMAT_VERSION} if you know it is this package's format {FORMAT_VERSION})"
            )
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def post_init(self) -> None:
        version = self.format_version
        if not isinstance(version, int) or isinstance(version, bool):
            raise UserInputError(
                f"config.json: quantization_config format_version={version!r} is a {type(version).__name__}, not an "
                f"integer; write it as a number (e.g. {FORMAT_VERSION}, not \"{FORMAT_VERSION}\") or save the model again"
            )
        if not 1 <= version <= FORMAT_VERSION:
            raise UserInputError(
                f"compressed checkpoint format_version={version!r} is not supported by this "
                f"hf_compress_prompt (it reads versions 1..{FORMAT_VERSION}); upgrade hf_compress_prompt"
            )
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise UserInputError(f"checkpoint_format={self.checkpoint_format!r} is not one of {CHECKPOINT_FORMATS}")
        if self.checkpoint_format == "gptq" and not self.gptq:
            raise UserInputError("checkpoint_format='gptq' needs the original GPTQ config under 'gptq'")
        if self.checkpoint_format == "compressed-tensors" and not self.compressed_tensors:
            raise UserInputError("checkpoint_format='compressed-tensors' needs the original config under "
                                 "'compressed_tensors'")
        self.layer_formats()  # validates every layer entry

    def layer_formats(self) -> dict[str, LinearFormat]:
        formats = {}
        for name, spec in self.layers.items():
            try:
                formats[name] = LinearFormat.from_dict(spec)
            except (TypeError, UserInputError) as exc:
                raise UserInputError(f"config.json: quantization_config layer {name!r}: {exc}") from None
        return formats

    @classmethod
    def from_gptq(cls, gptq_config: dict) -> CompressedConfig:
        """A config that loads a GPTQ checkpoint (``quant_method: "gptq"``) into this package's modules."""
        return cls(checkpoint_format="gptq", gptq=dict(gptq_config))

    @classmethod
    def from_compressed_tensors(cls, quant: dict, sparsity: dict[str, str] | None = None) -> CompressedConfig:
        """A config that loads a compressed-tensors ``pack-quantized`` checkpoint into this package's modules
        (``sparsity``: the sparse layers this package recorded when it exported the checkpoint)."""
        check_ct_config(quant)
        return cls(checkpoint_format="compressed-tensors",
                   compressed_tensors={"quantization_config": dict(quant), "sparsity": dict(sparsity or {})})


def install_packed_modules(model: nn.Module, formats: dict[str, LinearFormat], dtype: torch.dtype, device="meta") -> None:
    """Replaces each named module by an empty runtime module of its format (on ``device``)."""
    for name, fmt in formats.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantization_config names layer {name!r}, which this model does not have") from None
        if not isinstance(old, nn.Module):
            raise CheckpointError(f"{name!r} is not a module")
        model.set_submodule(name, packed_linear_class(fmt)(fmt, dtype=dtype, device=device))


def _checkpoint_to_model_names(model: nn.Module, names, hf_quantizer=None) -> dict[str, tuple[str, bool]]:
    """Model parameter name -> (the checkpoint tensor that loads into it, whether it loads as is), renaming the
    checkpoint's names the way transformers does while loading (its per-model renamings and conversions, and the
    base-model prefix). A tensor that a conversion fuses with others (``converted``) keeps no shape of its own."""
    meta = model.state_dict()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model, None, hf_quantizer)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
    except (ImportError, AttributeError, TypeError):  # another transformers: names as they are
        return {name: (name, True) for name in names}
    out: dict[str, tuple[str, bool]] = {}
    for name in names:
        target, pattern = rename_source_key(name, renamings, converters, getattr(model, "base_model_prefix", None), meta)
        if target not in out or pattern is None:
            out[target] = (name, pattern is None)
    return out


def _check_dense_tensors(model: nn.Module, found: dict[str, dict], skip: set[str], hf_quantizer=None) -> None:
    """Every tensor the (meta) model will load, other than those under the modules in ``skip`` (checked against
    their format), is in the checkpoint with its shape, and a float tensor holds floats: a missing dense tensor
    (say ``lm_head.weight``) would otherwise load as random values. Tied weights need only one of their group, and
    the model's ``_keys_to_ignore_on_load_missing`` may be absent."""
    present = _checkpoint_to_model_names(model, found, hf_quantizer)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    partners: dict[str, set[str]] = {}
    for target, source in tied.items():
        partners.setdefault(target, set()).add(source)
        partners.setdefault(source, set()).add(target)
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or ())]
    missing = []
    for key, tensor in model.state_dict().items():
        if key.rpartition(".")[0] in skip:
            continue
        if key not in present:
            if not (partners.get(key, set()) & present.keys()) and not any(p.search(key) for p in ignored):
                missing.append(key)
            continue
        name, as_is = present[key]
        info = found[name]
        if as_is and tuple(info["shape"]) != tuple(tensor.shape):
            raise CheckpointError(f"tensor {name!r} in {info['file']} has shape {list(info['shape'])}, the model "
                                  f"expects {list(tensor.shape)}; the folder does not match its config.json, save "
                                  "the model again")
        stored_float = info["dtype"].startswith(("float", "bfloat"))
        if as_is and stored_float != tensor.is_floating_point():
            raise CheckpointError(f"tensor {name!r} in {info['file']} has dtype {info['dtype']}, the model expects "
                                  f"{str(tensor.dtype).removeprefix('torch.')}; save the model again")
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}{', ...' if len(missing) > 4 else ''})" \
            if len(missing) > 1 else ""
        raise CheckpointError(f"compressed checkpoint {checkpoint_location(found)} is missing tensor {missing[0]!r}{more}, which "
                              "would load as random values; the folder is incomplete or was edited, save the model "
                              "again")


def _attach_saved_prompt(model, directory: Path | None) -> None:
    """Attaches the recovery prompt saved beside the weights (``recovery_prompt/``), if there is one."""
    add_recovery_methods(model)
    if directory is not None and (directory / PROMPT_SUBFOLDER).is_dir():
        attach_recovery_prompt(model, directory / PROMPT_SUBFOLDER)


class CompressedHfQuantizer(HfQuantizer):
    """Loads checkpoints of :class:`CompressedConfig` (and GPTQ checkpoints through it)."""

    requires_calibration = True  # compress with hf_compress_prompt.compressors first; nothing quantizes on the fly
    quantization_config: CompressedConfig

    def __init__(self, quantization_config: CompressedConfig, **kwargs):
        if not kwargs.get("pre_quantized", True):
            raise UserInputError(
                "hf_compress_prompt cannot compress a dense model inside from_pretrained (it needs calibration "
                "data): compress it with hf_compress_prompt.compress_ or the GPTQQuantizer / SparseGPTPruner "
                "classes (or `hf-compress-prompt compress`), save it, then load the saved folder"
            )
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs):
        return

    def update_attn_implementation(self, config):
        """The last hook that sees the model before transformers resolves its weight files: a local folder's
        layout is checked here (:func:`~.safetensors_check.check_folder`), so shards without their index, an
        unreadable index or a missing shard fail with one line naming the file instead of transformers' error."""
        folder = Path(str(getattr(config, "name_or_path", "") or ""))
        explicit = getattr(config, "transformers_weights", None)  # the config names its weights file: transformers'
        if folder.is_dir() and explicit is None and _saved_quantized(folder):
            check_folder(folder)
        return super().update_attn_implementation(config)

    def _process_model_before_weight_loading(self, model, dtype=None, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        float_dtype = dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype()
        found = checkpoint_tensors(checkpoint_files) if checkpoint_files else None
        self._checkpoint_dir = Path(checkpoint_files[0]).parent if checkpoint_files else None
        if config.checkpoint_format == "gptq":
            install_gptq_modules(model, config.gptq, found, float_dtype)
            _check_dense_tensors(model, found, {n for n, m in model.named_modules() if isinstance(m, GPTQImportLinear)},
                                 self)
            return model
        if config.checkpoint_format == "compressed-tensors":
            install_ct_modules(model, config.compressed_tensors["quantization_config"], found, float_dtype)
            _check_dense_tensors(model, found, {n for n, m in model.named_modules() if isinstance(m, CTImportLinear)},
                                 self)
            return model
        formats = config.layer_formats()
        if found is not None:
            expected = {}
            for name, fmt in formats.items():
                for tensor, spec in fmt.tensor_specs().items():
                    expected[f"{name}.{tensor}"] = (spec.shape, None if spec.dtype is None else str(spec.dtype).split(".")[1])
            check_tensors(expected, found)
        install_packed_modules(model, formats, float_dtype)
        if found is not None:
            _check_dense_tensors(model, found, set(formats), self)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.quantization_config.checkpoint_format == "gptq":
            layers = repack_gptq_modules(model)
            gptq = self.quantization_config.gptq
            self.quantization_config = CompressedConfig(layers={k: f.to_dict() for k, f in layers.items()},
                                                        recipe={"imported_from": {"quant_method": "gptq", **gptq}})
            model.config.quantization_config = self.quantization_config
        elif self.quantization_config.checkpoint_format == "compressed-tensors":
            ct = self.quantization_config.compressed_tensors
            sparsity = ct.get("sparsity") or {}
            masks = _read_masks(getattr(self, "_checkpoint_dir", None)) if sparsity else None
            layers = repack_ct_modules(model, sparsity, masks)
            quant = ct["quantization_config"]
            self.quantization_config = CompressedConfig(
                layers={k: f.to_dict() for k, f in layers.items()},
                recipe={"imported_from": {"quant_method": quant.get("quant_method"), "format": quant.get("format"),
                                          "version": quant.get("version")}})
            model.config.quantization_config = self.quantization_config
        use_growing_cache(model)  # generate appends keys/values in place (docs/results/decode_cache_1t.md)
        _attach_saved_prompt(model, getattr(self, "_checkpoint_dir", None))
        return model

    def _dequantize(self, model, dtype=None):
        for name, module in list(model.named_modules()):
            if isinstance(module, PackedLinear):
                linear = module.to_linear()
                model.set_submodule(name, linear.to(dtype) if dtype is not None else linear)
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Registers the config and the quantizer with transformers under ``quant_method="hf_compress_prompt"``.
    Safe to call again; a different class already registered under the name is an error."""
    for mapping, cls, decorator in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, CompressedConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, CompressedHfQuantizer, register_quantizer),
    ):
        existing = mapping.get(QUANT_METHOD)
        if existing is cls:
            continue
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"quant_method {QUANT_METHOD!r} is already registered to {existing!r}")
        if existing is not None:  # the same class from a reloaded module
            del mapping[QUANT_METHOD]
        decorator(QUANT_METHOD)(cls)


def attach_quantization_config(model: nn.Module, formats: dict[str, LinearFormat], *, recipe: dict | None = None,
                               dropped_layers: list[int] | None = None) -> CompressedConfig:
    """Marks an in-memory packed model as quantized with :class:`CompressedConfig`, so ``save_pretrained`` records
    the config and ``from_pretrained`` can load the folder."""
    existing = getattr(model.config, "quantization_config", None)
    layers = dict(existing.layers) if isinstance(existing, CompressedConfig) else {}
    layers.update({name: fmt.to_dict() for name, fmt in formats.items()})
    layers = {name: spec for name, spec in layers.items() if isinstance(_get(model, name), PackedLinear)}
    not_converted = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    config = CompressedConfig(layers=layers, recipe=recipe, dropped_layers=dropped_layers,
                              modules_to_not_convert=not_converted)
    model.config.quantization_config = config
    model.hf_quantizer = CompressedHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    return config


def _read_masks(directory: Path | None) -> dict[str, torch.Tensor]:
    """The keep masks of the sparse layers of an exported compressed-tensors checkpoint."""
    path = None if directory is None else directory / MASKS_FILE
    if path is None or not path.is_file():
        raise CheckpointError(f"the config records sparse layers but {MASKS_FILE} is missing from the folder; export "
                              "the model again")
    return load_file(str(path))


def _saved_quantized(folder: Path) -> bool:
    """Whether ``folder/config.json`` records a quantization config (this package's, or a GPTQ one it loads)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("quantization_config"), dict)


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
