"""Compressing a checkpoint folder without loading the model: one decoder block in memory at a time.

:func:`compress_pretrained` builds the model's skeleton on the meta device, loads what lies before the first block
(embeddings) from the source shards (lazily, ``safe_open``) when a step needs calibration inputs, and captures what
the first block receives for the calibration batches. Then each decoder block is read from the shards alone, every
recipe step compresses it (calibrated steps from the block inputs their own stream of activations carries, as the
in-memory loop would have given them), it is packed at once (no dense copy kept), its packed tensors go to a work
file, and it is put back on the meta device before the next block is read. At the end the output shards are written tensor by tensor in the layout
``save_pretrained`` gives (the same shard split, file names, index and byte order), with the config, generation
config and tokenizer: the folder equals, byte for byte, the one the in-memory path (``from_pretrained``, ``compress_``,
``save_pretrained``) writes for the same model, recipe and calibration.

Layer dropping as a recipe's first step is scored in one streaming pass (each block read, run, put back); dropped
blocks are never read again. A killed run resumes from its last finished block (``resume=True``) to the same bytes:
its state lives in a hidden work folder beside the output.

Peak memory: one block (dense, then packed) for calibrated steps, one linear for data-free ones (RTN, magnitude),
the calibration activations of each calibrated step (in the model's dtype, as in memory;
``activation_dtype=torch.bfloat16`` halves them, and they go to memory-mapped files in the work folder once they would
exceed ``max_activation_memory``), and the input embeddings while the calibration inputs are captured. The output
head is read only to be quantized; otherwise it, the embeddings and the final norm go from the source to the output
in slices.

Under ``torchrun`` (:mod:`.distributed`) each process pushes its share of the calibration batches through the
blocks, the layers' statistics are summed across processes and the solves dealt out to them; process 0 writes.
With ``device="cuda"`` each block is read to the GPU and compressed there (under ``torchrun`` each process on its own
GPU, over NCCL); the activations between blocks stay in host memory (or their mapped files).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .._logging import get_logger
from ..errors import MissingResourceError, UserInputError
from ..formats import LinearFormat
from ..formats.safetensors_header import parse_header
from ..formats.safetensors_stream import (
    entry_of,
    entry_of_chunks,
    read_rows,
    safetensors_dtype,
    write_safetensors,
)
from ..formats.saved_folder import atomic_directory, check_save_target
from ..formats.schema import RECIPE_CONFIG_KEY
from ..integrations import attach_quantization_config
from .activations import ActivationFile, activation_bytes, parse_size
from .blocks import BlockInputs, capture_block_inputs, find_decoder_layers, find_linear_layers
from .compress import BLOCKWISE_STEPS, _quantize_head, prepare_recipe, record_recipe
from .configs import CalibrationConfig, CompressionConfig, LayerDropConfig, Recipe
from .distributed import compute_device, process_group
from .layer_drop import choose_layers_to_drop, drop_layers
from .layerwise import compress_block, fix_mmap_threshold, release_memory
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

    def chunks(self, name: str, convert: Callable[[torch.Tensor], torch.Tensor], itemsize: int,
               max_bytes: int = 64 << 20):
        """Yields ``convert`` of the tensor ``name`` in consecutive slices along its first dimension, each at most
        ``max_bytes`` once converted to elements of ``itemsize`` bytes (elementwise conversions only: the slices'
        bytes are the whole tensor's), read with plain file reads
        (:func:`~hf_compress_prompt.formats.safetensors_stream.read_rows`)."""
        header = parse_header(self.files[name])
        shape = header.tensors[name].shape
        if not shape or shape[0] == 0:
            yield convert(self.get(name))
            return
        row = torch.Size(shape[1:]).numel() * itemsize
        step = max(1, max_bytes // max(1, row))
        for start in range(0, shape[0], step):
            yield convert(read_rows(self.files[name], name, start, start + step, header))


def is_safetensors_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local checkpoint folder with safetensors weights (the streaming path's input)."""
    folder = Path(path).expanduser()
    return (folder / "config.json").is_file() and ((folder / _INDEX).is_file() or (folder / _SINGLE).is_file())


def streaming_refusal(recipe: Recipe) -> str | None:
    """Why the streaming path cannot run ``recipe`` (the in-memory ``compress_`` can), or `None`."""
    for index, step in enumerate(recipe.steps):
        if isinstance(step, LayerDropConfig) and index == 0:
            continue  # scored in one streaming pass over the blocks before anything else
        if isinstance(step, LayerDropConfig):
            return ("the streaming path drops layers only as a recipe's first step (scoring them after another step "
                    "needs the whole compressed model); load the model and call compress_ instead")
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


def _load(model: nn.Module, source: CheckpointSource, names: list[str], dtype: torch.dtype,
          rename: tuple[str, str] | None = None, device: torch.device | str = "cpu") -> None:
    """Materialises the parameters and persistent buffers ``names`` from the source on ``device`` (floats cast to
    ``dtype``, as ``from_pretrained(..., dtype=dtype)`` does); ``rename = (model prefix, source prefix)`` maps a
    block's names to the source's (after layers were dropped, block 3 may be the source's block 4)."""
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        stored = rename[1] + name[len(rename[0]):] if rename and name.startswith(rename[0]) else name
        if stored not in source:
            raise MissingResourceError(f"{source.folder} lacks the tensor {stored!r} the model expects; the streaming "
                                       "path reads tensors by the model's own names: load the model in memory instead")
        set_module_tensor_to_device(model, name, device, value=_as_loaded(source.get(stored), dtype))


def _as_loaded(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A source tensor as ``from_pretrained(..., dtype=dtype)`` holds it: floats cast to ``dtype``."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _load_outside(model: nn.Module, source: CheckpointSource, path: str, tied: set[str], dtype: torch.dtype, *,
                  head: bool = True, device: torch.device | str = "cpu") -> None:
    """Materialises what lies outside the decoder blocks under ``path`` (embeddings, final norm and, with ``head``,
    the output head); a head tied to the embeddings (its name in ``tied``) shares the tensor read for them."""
    skip = set() if head else _head_names(model)
    _load(model, source, [n for n in _meta_names(model) if not n.startswith(f"{path}.") and n not in tied
                          and n not in skip], dtype, device=device)
    model.tie_weights()


def _head_names(model: nn.Module) -> set[str]:
    """State-dict names of the output head's tensors (``lm_head.weight``): what the calibration capture never runs."""
    head = model.get_output_embeddings()
    return {f"{name}.{key}" for name, module in model.named_modules() if module is head and head is not None
            for key in module.state_dict(keep_vars=True)}


def _free_outside(model: nn.Module, path: str) -> None:
    """Puts the parameters outside the decoder blocks back on the meta device. The embeddings and an untied head
    are vocabulary x hidden each, larger than a block's linears at a large vocabulary (a 128k-vocabulary 8B model's
    two take 4 GB in float32): the block loop does not need them (the output is written from the source, and a quantized head is read again)."""
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in model.named_parameters():  # a tied head is listed once, as the embeddings
        if not name.startswith(f"{path}."):
            set_module_tensor_to_device(model, name, "meta")
    model.tie_weights()
    release_memory()


def _streamed_blocks(model: nn.Module, source: CheckpointSource, path: str, layers: nn.ModuleList,
                     dtype: torch.dtype, device: torch.device):
    """Yields each decoder block read from the source; once the consumer moves on, the block goes back to meta."""
    for index in range(len(layers)):
        _load(model, source, _meta_names(model, f"{path}.{index}."), dtype, device=device)
        yield layers[index]
        layers[index] = layers[index].to("meta")


def _capture(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor],
             activation_dtype: torch.dtype | None, streams: int, limit: int | None, spill: Path):
    """What the first block receives for each calibration batch, captured batch by batch (in ``activation_dtype``,
    kept in host memory whatever device computes; the keyword arguments stay on that device), and, when ``streams``
    lists of them would exceed ``limit`` bytes, copied into the memory-mapped file ``spill`` as each batch is made. Returns the inputs and `None`, or the ``(numel, dtype)`` each step's spill files take."""
    inputs, file = BlockInputs(), None
    total = sum(ids.shape[0] for ids in batches)
    for k, ids in enumerate(batches):
        got = capture_block_inputs(model, layers, [ids])
        hidden = got.hidden[0].to(device="cpu", dtype=activation_dtype)
        if k == 0 and limit is not None and (need := activation_bytes(hidden, total, streams)) > limit:
            logger.info("the calibration activations (%.2f GB for %d step(s)) exceed max_activation_memory "
                        "(%.2f GB): kept in memory-mapped files in %s", need / 1e9, streams, limit / 1e9, spill.parent)
            file = ActivationFile(spill, hidden[0].numel() * total, hidden.dtype)
        inputs.hidden.append(hidden if file is None else file.take(hidden))
        inputs.kwargs.append(got.kwargs[0])
    return inputs, None if file is None else (file.numel, file.data.dtype)


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
    activation_dtype: torch.dtype | None = None,
    resume: bool = False,
    max_activation_memory: int | str | None = "4GB",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> CompressionResult:
    """Compresses the checkpoint folder ``src`` into ``dst`` with one decoder block in memory at a time.

    Run by every process of a ``torchrun`` job (after :func:`~.distributed.init_from_environment`), it splits the
    calibration batches and the solves between them and process 0 writes ``dst``: the same bytes as one process.

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
        activation_dtype (`torch.dtype`, *optional*): keep the calibration activations between blocks in this dtype
            (``torch.bfloat16`` halves their memory; each batch still runs in ``dtype``); `None` keeps them in
            ``dtype``, which gives the in-memory path's bytes.
        resume (`bool`, defaults to `False`): continue a killed run from its last finished block. Its state lives in
            the hidden work folder ``.<dst name>.hcp-stream`` beside ``dst`` (never at ``dst``): the finished blocks'
            packed tensors, the calibration activations after the last one, and a manifest of the source, recipe
            and calibration it belongs to; the output equals an uninterrupted run's byte for byte. Without
            ``resume``, a work folder left there is started over; after a finished run it is removed. A ``torchrun``
            job resumes with as many processes as it ran with (each process's activations are its own; another
            count is refused).
        max_activation_memory (`int` or `str`, *optional*, defaults to `"4GB"`): when the calibration activations
            between blocks (one list per calibrated step, in ``activation_dtype``) would take more, they are kept in
            memory-mapped files in the work folder instead (the same bytes: the output does not change). `None`
            keeps them in memory whatever their size.
        device (`str` or `torch.device`, *optional*, defaults to the CPU): where each block is computed
            (``"cuda"``: the block, its statistics and solves on the GPU, one block at a time; the activations
            between blocks stay in host memory and each batch moves to the GPU as it runs). Under ``torchrun``,
            ``"cuda"`` is each process's own GPU (``LOCAL_RANK``) and the processes talk over NCCL
            (:func:`~.distributed.init_from_environment`). A GPU gives other float bits than a CPU: the folder then
            equals what the in-memory path writes on that GPU, not on a CPU.

    Returns:
        `CompressionResult` with the recipe and the step reports; its ``masks`` and ``quantized`` are empty (the
        per-layer tensors went to the folder, never all in memory at once).

    Raises:
        UserInputError: a recipe the streaming path cannot run (:func:`streaming_refusal`), an output path a save
            may not write, or a ``resume`` with no work folder or one of another source, recipe or calibration.
            MissingResourceError: a source without config.json or safetensors weights.
    """
    source = CheckpointSource(src)
    device = compute_device(device)
    check_save_target(dst, overwrite=overwrite)
    model = _skeleton(source, dtype)
    # freed tensors leave the process at once: the peak does not climb with depth
    fix_mmap_threshold(getattr(model.config, "hidden_size", None))
    recipe, calibration_ids = prepare_recipe(model, config, tokenizer=tokenizer, calibration=calibration,
                                             calibration_ids=calibration_ids)
    refusal = streaming_refusal(recipe)
    if refusal is not None:
        raise UserInputError(refusal)

    group = process_group()  # torchrun: this process's share of the batches and of the solves
    main = group is None or group.is_main
    path, layers = find_decoder_layers(model)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # e.g. a head sharing the input embeddings
    blockwise = [(i, step, BLOCKWISE_STEPS[type(step)]) for i, step in enumerate(recipe.steps)
                 if type(step) in BLOCKWISE_STEPS]
    calibrated = [i for i, _, kind in blockwise if kind.calibrated]
    scores_layers = isinstance(recipe.steps[0], LayerDropConfig) and recipe.steps[0].layers is None
    if calibrated or scores_layers:  # the calibration batches run up to the first block: the head is not needed
        _load_outside(model, source, path, tied, dtype, head=False, device=device)
    state = CompressionState(calibration_ids)
    reports = [StepReport(step.method) for step in recipe.steps]
    original = list(range(len(layers)))  # the source's index of each block of the model
    if isinstance(recipe.steps[0], LayerDropConfig):
        step, started = recipe.steps[0], time.perf_counter()
        if step.layers is not None:
            dropped = list(step.layers)
        else:  # one pass over the blocks, each read from the source, run and put back on meta
            dropped, reports[0].layer_scores = choose_layers_to_drop(
                model, calibration_ids, step.count(len(layers)), score=step.score,
                batch_size=recipe.calibration.batch_size, progress=progress and main,
                blocks=_streamed_blocks(model, source, path, layers, dtype, device))
        drop_layers(model, dropped)
        reports[0].dropped_layers = sorted(dropped)
        reports[0].seconds = time.perf_counter() - started
        original = [i for i in original if i not in set(dropped)]
        path, layers = find_decoder_layers(model)
        logger.info("dropped layers %s", reports[0].dropped_layers)
    work = _WorkFolder(dst, {**_manifest(source, recipe, calibration_ids, dtype),
                             "activation_dtype": str(activation_dtype),
                             "processes": 1 if group is None else group.world_size}, resume=resume, create=main)
    if group is not None:
        group.barrier()  # process 0 has made (or checked) the work folder
    suffix = "" if group is None else f"-rank{group.rank}"
    inputs, streams, spilled = BlockInputs(), {}, None
    if calibrated:
        batches = list(torch.split(calibration_ids, recipe.calibration.batch_size))
        inputs, spilled = _capture(model, layers, batches if group is None else group.my_batches(batches),
                                   activation_dtype, len(calibrated), parse_size(max_activation_memory),
                                   work.path / f"activations-capture{suffix}.bin")
        streams = {i: inputs.hidden for i in calibrated}  # each calibrated step's own activations
    pattern = sparsity_pattern(recipe)
    formats: dict[str, LinearFormat] = {}
    done = -1
    if resume:
        done, formats, reports, saved_streams = work.progress(len(recipe.steps), suffix)
        streams.update(saved_streams)
        for index in range(done + 1):
            _restore_block(model, f"{path}.{index}", work.block_file(index), formats)
        logger.info("resuming %s after block %d of %d", work.path, done, len(layers))
    _free_outside(model, path)  # not needed while the blocks stream; written from the source at the end
    for index in tqdm(range(done + 1, len(layers)), desc="stream", unit="block", disable=not (progress and main),
                      initial=done + 1, total=len(layers)):
        prefix = f"{path}.{index}"
        rename = (prefix + ".", f"{path}.{original[index]}.")
        if not calibrated and group is None:  # data-free steps: one linear of the block in memory at a time
            formats.update(_one_linear_at_a_time(model, source, prefix, blockwise, state, reports, pattern, dtype,
                                                 rename, device))
            blockwise_left = []
        else:
            _load(model, source, _meta_names(model, prefix + "."), dtype, rename=rename, device=device)
            blockwise_left = blockwise
        block = layers[index]
        for i, step, kind in blockwise_left:
            started = time.perf_counter()
            work_fn = kind.make(step, state, reports[i])
            if kind.calibrated:
                keep = None
                if spilled is not None:  # this block's outputs go to a file (the other of the step's two)
                    keep = ActivationFile(work.path / f"activations-{i}-{index % 2}{suffix}.bin", *spilled).take
                share = None if group is None else functools.partial(group.share, state=state, report=reports[i])
                streams[i] = compress_block(block, prefix, inputs, streams[i], work_fn,
                                            true_sequential=step.true_sequential, diagonal_only=kind.diagonal_only,
                                            storage_dtype=activation_dtype, keep=keep, group=group, share=share,
                                            spill_dir=work.path,  # each H's last solve works in H itself
                                            grids=state.quantized.get)  # solved linears held as their codes
            else:
                linears = find_linear_layers(block)
                if group is None:
                    for name, module in linears.items():
                        work_fn(f"{prefix}.{name}", module)
                else:
                    group.deal(list(linears), lambda name: work_fn(f"{prefix}.{name}", linears[name]),
                               lambda name, owner: group.share(f"{prefix}.{name}", linears[name], owner, state,
                                                               reports[i]))
            reports[i].seconds += time.perf_counter() - started
        if blockwise_left:
            formats.update(_pack(model, state, pattern, prefix + "."))
        state.masks.clear()  # the block is packed: its grids and masks are in its packed modules now
        state.quantized.clear()
        block = layers[index]
        work.save_block(index, {f"{prefix}.{k}": v.cpu() for k, v in block.state_dict().items()}, streams, formats,
                        reports, group=group, suffix=suffix)
        layers[index] = block.to("meta")  # freed: the next block is read from the source alone
        release_memory()
        _after_block(index)
    if any(getattr(step, "lm_head", False) for step in recipe.steps):  # the head is quantized here (a tied one
        _load_outside(model, source, path, tied, dtype, device=device)  # from the embeddings); the rest is written
        # from the source
    block_files = {name: work.block_file(index) for index in range(len(layers) if main else 0)
                   for name in _tensor_names(work.block_file(index))}
    for i, step in enumerate(recipe.steps):
        if getattr(step, "lm_head", False):
            _quantize_head(model, step, state, reports[i])
    formats.update(_pack(model, state, pattern, f"{path}.", outside=True))  # the head
    record_recipe(model, recipe)
    if formats:
        attach_quantization_config(model, formats, recipe=getattr(model.config, RECIPE_CONFIG_KEY, None),
                                   dropped_layers=sorted(i for r in reports for i in r.dropped_layers))
    result = CompressionResult(recipe, reports, {}, {})
    if main:
        with atomic_directory(dst, overwrite=overwrite) as folder:
            _write_folder(model, folder, block_files, max_shard_size, source, dtype)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            extra = extra_files(result) if callable(extra_files) else extra_files
            for name, text in (extra or {}).items():
                (folder / name).write_text(text)
        work.remove()
    if group is not None:
        group.barrier()  # every process returns once the folder is there
    return result


# ---- the work folder: what a killed run leaves for --resume ----

_WORK_SUFFIX = ".hcp-stream"
_MANIFEST = "manifest.json"
_PROGRESS = "progress.json"


def _after_block(index: int) -> None:
    """Called once block ``index`` is safely in the work folder (tests kill the process here)."""


def _manifest(source: CheckpointSource, recipe: Recipe, calibration_ids: torch.Tensor | None,
              dtype: torch.dtype) -> dict:
    """What a run's work belongs to: the source (its config and weight files' sizes and times), the recipe, the
    calibration tokens and the precision. A resume must match it exactly."""
    import hashlib

    from ..formats.schema import FORMAT_VERSION

    files = sorted({p for p in source.files.values()})
    weights = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    calibration = None if calibration_ids is None else hashlib.sha256(
        calibration_ids.contiguous().numpy().tobytes()).hexdigest()
    return {"format_version": FORMAT_VERSION, "source": str(source.folder.resolve()),
            "source_config": hashlib.sha256((source.folder / "config.json").read_bytes()).hexdigest(),
            "source_weights": weights, "recipe": recipe.to_dict(), "calibration_sha256": calibration,
            "dtype": str(dtype)}


def _write_json(path: Path, data) -> None:
    """Writes ``path`` atomically (a temporary file beside it, then ``os.replace``)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _tensor_names(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        return list(handle.keys())


class _WorkFolder:
    """``.<dst name>.hcp-stream`` beside ``dst``: the manifest, the calibration activations after the last finished
    block (``state-NNNNN.safetensors``; under ``torchrun`` one file per process, ``state-NNNNN-rank<r>``), each
    finished block's packed tensors (``block-NNNNN.safetensors``) and ``progress.json`` (that block, the formats and
    reports so far), each written atomically in that order, and an earlier block's activations removed only once
    ``progress.json`` names the new block, so a run killed anywhere leaves a consistent state."""

    def __init__(self, dst: str | os.PathLike, manifest: dict, *, resume: bool, create: bool = True):
        target = Path(dst).expanduser().resolve()
        self.path = target.parent / f".{target.name}{_WORK_SUFFIX}"
        self.manifest = manifest = json.loads(json.dumps(manifest))  # as it reads back (tuples become lists)
        if not create:
            return  # another process of a torchrun job makes it
        mine = (self.path / _MANIFEST).is_file()
        if resume:
            if not mine or not (self.path / _PROGRESS).is_file():
                raise UserInputError(f"resume: there is no interrupted run to resume for {target} (no work folder "
                                     f"{self.path.name} beside it with a finished block); run without --resume")
            saved = json.loads((self.path / _MANIFEST).read_text())
            differ = [k for k in manifest if saved.get(k) != manifest[k]]
            if differ == ["processes"] and saved.get("processes"):
                n = saved["processes"]
                raise UserInputError(f"resume: the work folder {self.path} is a run of {n} process(es) (each keeps its "
                                     f"own activations); resume it with as many ("
                                     + ("without torchrun" if n == 1 else f"torchrun --nproc_per_node {n}")
                                     + "), or run without --resume to start over")
            if differ:
                raise UserInputError(f"resume: the work folder {self.path} belongs to another run (its {', '.join(differ)} "
                                     "differ from this one's); run without --resume to start over")
            return
        if self.path.exists():
            if not mine:
                raise UserInputError(f"{self.path} exists and is not a work folder of this package; move it away")
            logger.warning("starting over: removing the earlier run's work folder %s (resume=True continues it)",
                           self.path)
            self.remove()
        self.path.mkdir()
        _write_json(self.path / _MANIFEST, manifest)

    def block_file(self, index: int) -> Path:
        return self.path / f"block-{index:05d}.safetensors"

    def state_file(self, index: int, suffix: str = "") -> Path:
        return self.path / f"state-{index:05d}{suffix}.safetensors"

    def save_block(self, index: int, tensors: dict[str, torch.Tensor], streams: dict[int, list[torch.Tensor]],
                   formats: dict, reports: list[StepReport], *, group=None, suffix: str = "") -> None:
        """Every process saves its activations after block ``index``; process 0 then the block's packed
        ``tensors`` and the progress naming it; then each process removes its earlier activations."""
        from safetensors.torch import save_file

        tmp = self.path / f"state{suffix}.tmp"
        state = {f"{step}.{batch}": h.contiguous() for step, hidden in streams.items() for batch, h in enumerate(hidden)}
        save_file(state, tmp)
        os.replace(tmp, self.state_file(index, suffix))
        if group is not None:
            group.barrier()  # every process's activations are on disk before the progress names this block
        if group is None or group.is_main:
            tmp = self.path / "block.tmp"
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, self.block_file(index))
            _write_json(self.path / _PROGRESS, {
                "done": index, "formats": {n: f.to_dict() for n, f in formats.items()},
                "reports": [{"method": r.method, "seconds": r.seconds, "layers": r.layers} for r in reports]})
        if group is not None:
            group.barrier()  # the progress names this block: the earlier activations are no longer needed
        for old in self.path.glob(f"state-?????{suffix}.safetensors"):  # this process's files only
            if old != self.state_file(index, suffix):
                old.unlink()  # ours: this process's activations after an earlier block

    def progress(self, steps: int, suffix: str = "") -> tuple[int, dict, list[StepReport], dict[int, list[torch.Tensor]]]:
        """The last finished block, the formats and reports so far and this process's activations after that
        block."""
        from safetensors.torch import load_file

        data = json.loads((self.path / _PROGRESS).read_text())
        done = int(data["done"])
        formats = {n: LinearFormat.from_dict(f) for n, f in data["formats"].items()}
        reports = [StepReport(r["method"], seconds=r["seconds"], layers=r["layers"]) for r in data["reports"]]
        if len(reports) != steps:
            raise UserInputError(f"resume: {self.path} holds {len(reports)} steps' reports, this recipe {steps}; "
                                 "run without --resume to start over")
        state = load_file(self.state_file(done, suffix))
        streams: dict[int, list[torch.Tensor]] = {}
        for key in sorted(state, key=lambda k: tuple(int(x) for x in k.split("."))):
            step, _ = (int(x) for x in key.split("."))
            streams.setdefault(step, []).append(state[key])
        return done, formats, reports, streams

    def remove(self) -> None:
        import shutil

        if (self.path / _MANIFEST).is_file():  # only a folder this package made
            shutil.rmtree(self.path)


def _restore_block(model: nn.Module, prefix: str, file: Path, formats: dict) -> None:
    """Puts a block a killed run finished back into the skeleton as it left it: its packed layers (on the meta
    device, their tensors stay in ``file``), checked against the file's tensors."""
    from safetensors import safe_open

    from ..nn import packed_linear_class

    with safe_open(file, framework="pt") as handle:
        saved = {n: (handle.get_slice(n).get_dtype(), tuple(handle.get_slice(n).get_shape())) for n in handle.keys()}  # noqa: SIM118
    for name, fmt in formats.items():
        if not name.startswith(prefix + "."):
            continue
        floats = [n for n in saved if n.startswith(name + ".") and saved[n][0] in ("F32", "BF16", "F16")]
        dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[saved[floats[0]][0]] \
            if floats else torch.get_default_dtype()
        model.set_submodule(name, packed_linear_class(fmt)(fmt, dtype=dtype, device="meta"))
    expected = {f"{prefix}.{k}": (v.dtype, tuple(v.shape)) for k, v in
                model.get_submodule(prefix).state_dict(keep_vars=True).items()}
    if {n: (safetensors_dtype(d), s) for n, (d, s) in expected.items()} != saved:
        raise UserInputError(f"resume: {file} does not hold the block the recipe makes; run without --resume to start "
                             "over")


def _one_linear_at_a_time(model: nn.Module, source: CheckpointSource, prefix: str, steps: list, state: CompressionState,
                          reports: list[StepReport], pattern, dtype: torch.dtype, rename: tuple[str, str],
                          device: torch.device) -> dict:
    """Data-free steps (RTN, magnitude, N:M by magnitude) on the block ``prefix``: its other tensors are read, then
    each linear is read, compressed by every step, packed and its memory given back before the next is read. These
    steps see one linear at a time, so the numbers are the whole block's; the peak is one linear, not a block.
    Returns the packed layers' formats."""
    linears = list(find_linear_layers(model.get_submodule(prefix)))  # names: the modules would outlive their packing
    inside = tuple(f"{prefix}.{name}." for name in linears)
    _load(model, source, [n for n in _meta_names(model, prefix + ".") if not n.startswith(inside)], dtype,
          rename=rename, device=device)
    work = [(i, kind.make(step, state, reports[i])) for i, step, kind in steps]
    formats = {}
    for name in linears:
        full = f"{prefix}.{name}"
        _load(model, source, _meta_names(model, full + "."), dtype, rename=rename, device=device)
        module = model.get_submodule(full)
        for i, compress in work:
            started = time.perf_counter()
            compress(full, module)
            reports[i].seconds += time.perf_counter() - started
        if module in state.masks or module in state.quantized:
            formats[full] = pack_linear_module(model, full, state.quantized.pop(module, None),
                                               state.masks.pop(module, None), pattern)
        del module  # the dense linear, replaced by its packed module
        release_memory()
    return formats


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


def _write_folder(model: nn.Module, folder: Path, block_files: dict[str, Path], max_shard_size,
                  source: CheckpointSource, dtype: torch.dtype) -> None:
    """What ``model.save_pretrained(folder)`` writes, from a model whose blocks are on the meta device and whose
    block tensors are in ``block_files``: config, generation config, shards and, when sharded, the index. A tensor
    on the meta device comes from its block's work file, or, outside the blocks (embeddings, norm, an unquantized
    head), from the source in slices cast as :func:`_load` casts: at most one block tensor, or a 64 MB slice of
    another, in memory at a time."""
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
            release_memory()  # what the tensor written before this one held
            with safe_open(block_files[name], framework="pt") as handle:
                return handle.get_tensor(name)
        return read

    def from_source(name: str, held: torch.dtype):
        def chunks():
            release_memory()
            # the widest of the load-time dtype and the written one: what a converted slice holds at most
            itemsize = max(torch.empty((), dtype=d).element_size() for d in (dtype, held))
            yield from source.chunks(name, lambda t: _as_loaded(t, dtype).to(held), itemsize)
        return chunks

    for file, names in split.filename_to_tensors.items():
        entries = []
        for name in names:
            tensor = state_dict[name]
            if tensor.device.type == "meta" and name in block_files:
                entries.append(entry_of(name, lazy(name), dtype=tensor.dtype, shape=tuple(tensor.shape)))
            elif tensor.device.type == "meta":
                entries.append(entry_of_chunks(name, from_source(name, tensor.dtype), dtype=tensor.dtype,
                                               shape=tuple(tensor.shape)))
            else:
                entries.append(entry_of(name, tensor.contiguous().cpu()))  # e.g. a head quantized on a GPU
        write_safetensors(folder / file, entries, {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (folder / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
