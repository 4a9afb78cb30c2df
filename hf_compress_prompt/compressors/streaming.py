"""Compressing a checkpoint folder without loading the model: one decoder block in memory at a time.

:func:`compress_pretrained` builds the model's skeleton on the meta device, loads the embeddings, norms and head from
the source shards (lazily, ``safe_open``), and captures what the first block receives for the calibration batches.
Then each decoder block is read from the shards alone, every recipe step compresses it (calibrated steps from the
block inputs their own stream of activations carries, as the in-memory loop would have given them), it is packed
at once (no dense copy kept), its packed tensors go to a work file, and it is put back on the meta device before
the next block is read. At the end the output shards are written tensor by tensor in the layout
``save_pretrained`` gives (the same shard split, file names, index and byte order), with the config, generation
config and tokenizer: the folder equals, byte for byte, the one the in-memory path (``from_pretrained``, ``compress_``,
``save_pretrained``) writes for the same model, recipe and calibration.

Peak memory: one block (dense, then packed), the embeddings, norms and head, and the calibration activations of
each calibrated step (fp32, as in memory). Not yet here (issue 25, later steps): layer dropping, activations held in
bf16 or spilled to disk, resuming a killed run, torch.distributed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .._logging import get_logger
from ..errors import MissingResourceError, UserInputError
from ..formats.safetensors_stream import entry_of, write_safetensors
from ..formats.saved_folder import atomic_directory, check_save_target
from ..formats.schema import RECIPE_CONFIG_KEY
from ..integrations import attach_quantization_config
from .blocks import BlockInputs, capture_block_inputs, find_decoder_layers, find_linear_layers
from .compress import BLOCKWISE_STEPS, _quantize_head, prepare_recipe, record_recipe
from .configs import CalibrationConfig, CompressionConfig, Recipe
from .layerwise import compress_block
from .pack import pack_linear_module, sparsity_pattern
from .state import CompressionResult, CompressionState, StepReport

__all__ = ["CheckpointSource", "compress_pretrained", "is_safetensors_folder", "streaming_refusal"]

logger = get_logger(__name__)

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointSource:
    """The tensors of a saved checkpoint folder, read one at a time (``safe_open``) by state-dict name.

    Raises:
        MissingResourceError: the folder has no ``config.json`` or no safetensors weights (pickle-only checkpoints
            are refused, as everywhere in this package). UserInputError: it is already compressed.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        if not (self.folder / "config.json").is_file():
            raise MissingResourceError(f"{self.folder} has no config.json; pass a saved model folder")
        if json.loads((self.folder / "config.json").read_text()).get("quantization_config"):
            raise UserInputError(f"{self.folder} is already compressed (quantization_config in config.json); "
                                 "compress the original model")
        if (self.folder / _INDEX).is_file():
            weight_map = json.loads((self.folder / _INDEX).read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / _SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(self.folder / _SINGLE, framework="pt") as handle:
                self.files = {name: self.folder / _SINGLE for name in handle.keys()}  # noqa: SIM118
        else:
            pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            what = f"only pickle weights ({', '.join(pickles)}), which are refused: they can run code when read" \
                if pickles else "no model.safetensors or model.safetensors.index.json"
            raise MissingResourceError(f"{self.folder} holds {what}; save the model with safetensors "
                                       "(model.save_pretrained(folder)) and compress that")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as handle:
            return handle.get_tensor(name)


def is_safetensors_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local checkpoint folder with safetensors weights (the streaming path's input)."""
    folder = Path(path).expanduser()
    return (folder / "config.json").is_file() and ((folder / _INDEX).is_file() or (folder / _SINGLE).is_file())


def streaming_refusal(recipe: Recipe) -> str | None:
    """Why the streaming path cannot run ``recipe`` (the in-memory ``compress_`` can), or `None`."""
    for step in recipe.steps:
        if type(step) not in BLOCKWISE_STEPS:
            return (f"the streaming path does not run {step.method!r} steps yet (it compresses one block at a time; "
                    f"{step.method} needs the whole model); load the model and call compress_ instead")
    return None


def _skeleton(source: CheckpointSource, dtype: torch.dtype):
    """The model built on the meta device (buffers real), its generation config as the folder saved it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(source.folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (source.folder / "generation_config.json").is_file() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(source.folder)
    return model.eval()


def _load(model: nn.Module, source: CheckpointSource, names: list[str], dtype: torch.dtype) -> None:
    """Materialises the parameters and persistent buffers ``names`` from the source (floats cast to ``dtype``, as
    ``from_pretrained(..., dtype=dtype)`` does)."""
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        if name not in source:
            raise MissingResourceError(f"{source.folder} lacks the tensor {name!r} the model expects; the streaming "
                                       "path reads tensors by the model's own names: load the model in memory instead")
        tensor = source.get(name)
        set_module_tensor_to_device(model, name, "cpu", value=tensor.to(dtype) if tensor.is_floating_point() else tensor)


def _meta_names(model: nn.Module, prefix: str = "") -> list[str]:
    """State-dict names under ``prefix`` whose tensors are still on the meta device."""
    return [n for n, t in model.state_dict(keep_vars=True).items() if n.startswith(prefix) and t.device.type == "meta"]


def compress_pretrained(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: CompressionConfig | Recipe | list[CompressionConfig] | str,
    *,
    tokenizer=None,
    calibration: CalibrationConfig | None = None,
    calibration_ids: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    max_shard_size: int | str = "50GB",
    extra_files: dict[str, str] | Callable[[CompressionResult], dict[str, str]] | None = None,
    progress: bool = True,
) -> CompressionResult:
    """Compresses the checkpoint folder ``src`` into ``dst`` with one decoder block in memory at a time.

    Args:
        src: a folder ``save_pretrained`` wrote (safetensors, one file or sharded with its index).
        dst: the output folder, written atomically (an interrupted run leaves what was there before); an existing
            saved model there is replaced only with ``overwrite``, and a folder holding anything else is refused.
        config: a step, a list of steps, a :class:`Recipe` or a preset name (as :func:`~.compress.compress_`).
        tokenizer (*optional*): samples the calibration windows (needed by calibrated recipes unless
            ``calibration_ids`` is given) and is saved with the model.
        dtype (`torch.dtype`, defaults to `torch.float32`): the precision the model is compressed in (the CLI's
            and ``load_model_and_tokenizer``'s).
        max_shard_size: as ``save_pretrained``'s.
        extra_files (*optional*): more files (name -> text) written into the folder, or a callable making them from
            the result (e.g. a report with the steps' times).

    Returns:
        `CompressionResult` with the recipe and the step reports; its ``masks`` and ``quantized`` are empty (the
        per-layer tensors went to the folder, never all in memory at once).

    Raises:
        UserInputError: a recipe the streaming path cannot run (:func:`streaming_refusal`), or an output path a save
            may not write. MissingResourceError: a source without config.json or safetensors weights.
    """
    source = CheckpointSource(src)
    check_save_target(dst, overwrite=overwrite)
    model = _skeleton(source, dtype)
    recipe, calibration_ids = prepare_recipe(model, config, tokenizer=tokenizer, calibration=calibration,
                                             calibration_ids=calibration_ids)
    refusal = streaming_refusal(recipe)
    if refusal is not None:
        raise UserInputError(refusal)

    path, layers = find_decoder_layers(model)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # e.g. a head sharing the input embeddings
    _load(model, source, [n for n in _meta_names(model) if not n.startswith(f"{path}.") and n not in tied], dtype)
    model.tie_weights()  # a tied head shares the embeddings just read
    state = CompressionState(calibration_ids)
    reports = [StepReport(step.method) for step in recipe.steps]
    calibrated = [i for i, step in enumerate(recipe.steps) if BLOCKWISE_STEPS[type(step)].calibrated]
    inputs, streams = BlockInputs(), {}
    if calibrated:
        batches = list(torch.split(calibration_ids, recipe.calibration.batch_size))
        inputs = capture_block_inputs(model, layers, batches)
        streams = {i: inputs.hidden for i in calibrated}  # each calibrated step's own activations
    from safetensors.torch import save_file

    pattern = sparsity_pattern(recipe)
    formats = {}
    parent = Path(dst).expanduser().resolve().parent
    with tempfile.TemporaryDirectory(prefix=f".{Path(dst).name}.hcp-stream-", dir=parent) as work:
        work = Path(work)
        block_files: dict[str, Path] = {}
        for index in tqdm(range(len(layers)), desc="stream", unit="block", disable=not progress):
            prefix = f"{path}.{index}"
            _load(model, source, _meta_names(model, prefix + "."), dtype)
            block = layers[index]
            for i, step in enumerate(recipe.steps):
                started = time.perf_counter()
                kind = BLOCKWISE_STEPS[type(step)]
                work_fn = kind.make(step, state, reports[i])
                if kind.calibrated:
                    streams[i] = compress_block(block, prefix, inputs, streams[i], work_fn,
                                                true_sequential=step.true_sequential,
                                                diagonal_only=kind.diagonal_only)
                else:
                    for name, module in find_linear_layers(block).items():
                        work_fn(f"{prefix}.{name}", module)
                reports[i].seconds += time.perf_counter() - started
            formats.update(_pack(model, state, pattern, prefix + "."))
            block = layers[index]
            tensors = {f"{prefix}.{k}": v.contiguous() for k, v in block.state_dict().items()}
            file = work / f"block-{index:05d}.safetensors"
            save_file(tensors, file)
            block_files.update(dict.fromkeys(tensors, file))
            del tensors
            layers[index] = block.to("meta")  # freed: the next block is read from the source alone
        for i, step in enumerate(recipe.steps):
            if getattr(step, "lm_head", False):
                _quantize_head(model, step, state, reports[i])
        formats.update(_pack(model, state, pattern, f"{path}.", outside=True))  # the head
        record_recipe(model, recipe)
        if formats:
            attach_quantization_config(model, formats, recipe=getattr(model.config, RECIPE_CONFIG_KEY, None),
                                       dropped_layers=[])
        with atomic_directory(dst, overwrite=overwrite) as folder:
            _write_folder(model, folder, block_files, max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            result = CompressionResult(recipe, reports, {}, {})
            extra = extra_files(result) if callable(extra_files) else extra_files
            for name, text in (extra or {}).items():
                (folder / name).write_text(text)
    return result


def _pack(model: nn.Module, state: CompressionState, pattern, prefix: str, *, outside: bool = False) -> dict:
    """Packs every compressed linear named under ``prefix`` (``outside``: not under it), as ``pack_model`` does;
    returns their formats."""
    names = sorted(n for n, m in model.named_modules() if n.startswith(prefix) != outside
                   and (m in state.masks or m in state.quantized))
    formats = {}
    for name in names:
        module = model.get_submodule(name)
        formats[name] = pack_linear_module(model, name, state.quantized.get(module), state.masks.get(module), pattern)
    return formats


def _write_folder(model: nn.Module, folder: Path, block_files: dict[str, Path], max_shard_size) -> None:
    """What ``model.save_pretrained(folder)`` writes, from a model whose blocks are on the meta device and whose
    block tensors are in ``block_files``: config, generation config, shards (one tensor in memory at a time) and,
    when sharded, the index."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state_dict = remove_tied_weights_from_state_dict(model.state_dict(), model)
    # from_pretrained leaves the conversions it applied (none: the source was read by the model's own names), and
    # save_pretrained then writes the state dict in natural key order: so do we
    model._weight_conversions = []
    state_dict = revert_weight_conversion(model, state_dict)
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [model.__class__.__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    split = split_torch_state_dict_into_shards(state_dict, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)

    def lazy(name: str):
        from safetensors import safe_open

        def read():
            with safe_open(block_files[name], framework="pt") as handle:
                return handle.get_tensor(name)
        return read

    for file, names in split.filename_to_tensors.items():
        entries = []
        for name in names:
            tensor = state_dict[name]
            if tensor.device.type == "meta":
                entries.append(entry_of(name, lazy(name), dtype=tensor.dtype, shape=tuple(tensor.shape)))
            else:
                entries.append(entry_of(name, tensor.contiguous()))
        write_safetensors(folder / file, entries, {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (folder / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
