"""One entry point, ``compress_(model, config_or_recipe)``, dispatching each recipe step to the handler registered
for its config type."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .._logging import get_logger
from ..data import calibration_batches, training_corpus
from ..errors import UserInputError
from ..formats.schema import RECIPE_CONFIG_KEY
from ..methods.gptq import gptq_quantize
from ..methods.magnitude import magnitude_prune
from ..methods.quant_grid import QuantizedWeight
from ..methods.rtn import rtn_quantize
from ..methods.sparsegpt import sparsegpt_prune
from ..methods.wanda import wanda_prune
from ..nn import has_packed_layers
from .blocks import find_decoder_layers, find_linear_layers, linear_weight, set_linear_weight
from .configs import (
    CalibrationConfig,
    CompressionConfig,
    GPTQConfig,
    LayerDropConfig,
    MagnitudeConfig,
    Recipe,
    RTNConfig,
    SparseGPTConfig,
    WandaConfig,
)
from .layer_drop import choose_layers_to_drop, drop_layers
from .layerwise import compress_layerwise
from .pack import pack_model
from .presets import preset_steps
from .state import CompressionResult, CompressionState, StepReport

__all__ = [
    "RECIPE_CONFIG_KEY",
    "CompressionResult",
    "block_linears",
    "compress_",
    "prepare_recipe",
    "record_pruned",
    "record_quantized",
    "record_recipe",
    "register_compressor",
]

logger = get_logger(__name__)


Handler = Callable[[nn.Module, CompressionConfig, CompressionState, StepReport, Recipe, bool], None]
_HANDLERS: dict[type[CompressionConfig], Handler] = {}


def register_compressor(config_cls: type[CompressionConfig]) -> Callable[[Handler], Handler]:
    """Registers the handler that runs steps of type ``config_cls``; a second handler for one type is an error."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, CompressionConfig)):
        raise TypeError(f"register_compressor expects a CompressionConfig subclass, got {config_cls!r}")

    def decorator(handler: Handler) -> Handler:
        if config_cls in _HANDLERS:
            raise ValueError(f"a compressor for {config_cls.__name__} is already registered")
        _HANDLERS[config_cls] = handler
        return handler

    return decorator


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every linear layer inside the decoder blocks, in forward order."""
    path, layers = find_decoder_layers(model)
    return [(f"{path}.{i}.{name}", m) for i, block in enumerate(layers) for name, m in find_linear_layers(block).items()]


def _record(report: StepReport, name: str, module: nn.Module, state: CompressionState, **extra) -> None:
    mask = state.masks.get(module)
    sparsity = float(mask.float().mean()) if mask is not None else 0.0
    report.layers[name] = {"sparsity": sparsity, **extra}


def record_quantized(state: CompressionState, name: str, module: nn.Module, qw: QuantizedWeight, report: StepReport) -> None:
    """A handler's result for one quantized linear: its weight becomes ``qw``'s grid values, and packing will store
    ``qw``'s codes, scales and zeros."""
    set_linear_weight(module, qw.dequantize())
    state.quantized[module] = qw
    _record(report, name, module, state, bits=qw.bits, group_size=qw.group_size)


def record_pruned(state: CompressionState, name: str, module: nn.Module, weight: torch.Tensor, mask: torch.Tensor,
                  report: StepReport) -> None:
    """A handler's result for one pruned linear: ``weight`` (out, in) with zeros where ``mask`` (bool, True = pruned)
    is set; packing stores the kept values (N:M or bitmask, from the step's ``sparsity``)."""
    set_linear_weight(module, weight)
    state.masks[module] = mask
    _record(report, name, module, state)


def untie_output_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The output head (LM head) by qualified name, given its own weight if it shared the input embedding's (the
    config then says ``tie_word_embeddings=False``, so saving and loading keep them apart)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise UserInputError(f"{type(model).__name__} has no linear output head to quantize (lm_head=True)")
    name = next(n for n, m in model.named_modules() if m is head)
    embedding = model.get_input_embeddings()
    if embedding is not None and head.weight is embedding.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for config in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    return name, head


def _quantize_head(model, step, state, report) -> None:
    """Round-to-nearest on the output head (``lm_head=True``): it reads as many bytes per token as a third of the
    SmolLM2 blocks together, so a 4-bit model that leaves it in 16 bits spends much of each decode step there."""
    name, head = untie_output_head(model)
    qw = rtn_quantize(head.weight.data.float(), step.lm_head_bits or step.bits, step.group_size, step.symmetric)
    record_quantized(state, name, head, qw, report)


# ---- per-linear work of each step: the in-memory handlers below loop it over the model, the streaming path
# (streaming.py) over one block at a time; both run these same functions, so both write the same numbers ----

def rtn_linear(step: RTNConfig, state: CompressionState, report: StepReport):
    """RTN's work on one linear: ``(name, module) -> None``."""
    def compress(name, module):
        qw = rtn_quantize(linear_weight(module).float(), step.bits, step.group_size, step.symmetric)
        record_quantized(state, name, module, qw, report)  # zeros of an earlier pruning step stay exactly 0
    return compress


def magnitude_linear(step: MagnitudeConfig, state: CompressionState, report: StepReport):
    """Magnitude pruning's work on one linear: ``(name, module) -> None``."""
    def compress(name, module):
        weight, mask = magnitude_prune(linear_weight(module).float(), step.sparsity)
        record_pruned(state, name, module, weight, mask, report)
    return compress


def gptq_linear(step: GPTQConfig, state: CompressionState, report: StepReport):
    """GPTQ's work on one linear given its input statistics: a :data:`~.layerwise.LinearCompressor`."""
    def compress(name, module, W, acc):
        qw = gptq_quantize(
            W, _hessian(acc), step.bits, step.group_size, step.symmetric, step.act_order, step.damp, step.block_size,
            prune_mask=state.masks.get(module), spill_dir=acc.spill_dir,
        )
        record_quantized(state, name, module, qw, report)
    return compress


def _hessian(acc) -> torch.Tensor:
    """The H a solve reads: handed over when the solve is its last reader and may overwrite it (``spill_dir``)."""
    return acc.take_H() if acc.spill_dir is not None else acc.H


def sparsegpt_linear(step: SparseGPTConfig, state: CompressionState, report: StepReport):
    """SparseGPT's work (pruning, and quantization when ``bits`` is set) on one linear given its statistics."""
    def compress(name, module, W, acc):
        weight, mask, qw = sparsegpt_prune(
            W, _hessian(acc), step.sparsity, step.bits, step.group_size, step.symmetric, step.damp, step.block_size,
            spill_dir=acc.spill_dir,
        )
        set_linear_weight(module, weight)
        state.masks[module] = mask
        if qw is not None:
            state.quantized[module] = qw
        _record(report, name, module, state, **({"bits": qw.bits, "group_size": qw.group_size} if qw else {}))
    return compress


def wanda_linear(step: WandaConfig, state: CompressionState, report: StepReport):
    """Wanda's work on one linear given its inputs' channel norms."""
    def compress(name, module, W, acc):
        weight, mask = wanda_prune(W, acc.channel_sq_norm, step.sparsity)
        record_pruned(state, name, module, weight, mask, report)
    return compress


@dataclass(frozen=True)
class BlockwiseStep:
    """How a step compresses one decoder block at a time: its per-linear work (``make(step, state, report)``) and
    whether that work needs calibration statistics (then a :data:`~.layerwise.LinearCompressor`, run by
    :func:`~.layerwise.compress_block`; Wanda's diagonal ones only), else ``(name, module) -> None``."""

    make: Callable
    calibrated: bool
    diagonal_only: bool = False


BLOCKWISE_STEPS: dict[type[CompressionConfig], BlockwiseStep] = {
    RTNConfig: BlockwiseStep(rtn_linear, calibrated=False),
    MagnitudeConfig: BlockwiseStep(magnitude_linear, calibrated=False),
    GPTQConfig: BlockwiseStep(gptq_linear, calibrated=True),
    SparseGPTConfig: BlockwiseStep(sparsegpt_linear, calibrated=True),
    WandaConfig: BlockwiseStep(wanda_linear, calibrated=True, diagonal_only=True),
}


@register_compressor(RTNConfig)
def _run_rtn(model, step: RTNConfig, state, report, recipe, progress) -> None:
    compress = rtn_linear(step, state, report)
    for name, module in tqdm(block_linears(model), desc="rtn", unit="linear", disable=not progress):
        compress(name, module)
    if step.lm_head:
        _quantize_head(model, step, state, report)


@register_compressor(MagnitudeConfig)
def _run_magnitude(model, step: MagnitudeConfig, state, report, recipe, progress) -> None:
    compress = magnitude_linear(step, state, report)
    for name, module in tqdm(block_linears(model), desc="magnitude", unit="linear", disable=not progress):
        compress(name, module)


@register_compressor(GPTQConfig)
def _run_gptq(model, step: GPTQConfig, state, report, recipe, progress) -> None:
    compress_layerwise(model, state.calibration_ids, gptq_linear(step, state, report),
                       batch_size=recipe.calibration.batch_size, true_sequential=step.true_sequential, desc="gptq",
                       progress=progress)
    if step.lm_head:
        _quantize_head(model, step, state, report)  # round-to-nearest: GPTQ covers the decoder blocks


@register_compressor(SparseGPTConfig)
def _run_sparsegpt(model, step: SparseGPTConfig, state, report, recipe, progress) -> None:
    compress_layerwise(model, state.calibration_ids, sparsegpt_linear(step, state, report),
                       batch_size=recipe.calibration.batch_size, true_sequential=step.true_sequential,
                       desc="sparsegpt", progress=progress)


@register_compressor(WandaConfig)
def _run_wanda(model, step: WandaConfig, state, report, recipe, progress) -> None:
    compress_layerwise(model, state.calibration_ids, wanda_linear(step, state, report),
                       batch_size=recipe.calibration.batch_size, true_sequential=step.true_sequential,
                       diagonal_only=True, desc="wanda", progress=progress)


@register_compressor(LayerDropConfig)
def _run_layer_drop(model, step: LayerDropConfig, state, report, recipe, progress) -> None:
    _, layers = find_decoder_layers(model)
    if step.layers is not None:
        indices = list(step.layers)
    else:
        indices, report.layer_scores = choose_layers_to_drop(
            model, state.calibration_ids, step.count(len(layers)), score=step.score, batch_size=recipe.calibration.batch_size,
            progress=progress,
        )
    drop_layers(model, indices)
    report.dropped_layers = sorted(indices)
    logger.info("dropped layers %s", report.dropped_layers)


def _validate(model: nn.Module, recipe: Recipe) -> None:
    """Every check that can fail, before any work starts."""
    find_decoder_layers(model)  # unsupported architectures fail here
    if any(s.prunes or s.quantizes for s in recipe.steps) and has_packed_layers(model):
        raise UserInputError(
            "this model already holds packed (compressed) layers; prune or quantize the dense model instead "
            "(compress_(..., pack=False) keeps dense weights between calls)"
        )
    for step in recipe.steps:
        if type(step) not in _HANDLERS:
            raise UserInputError(f"no compressor is registered for {type(step).__name__}")
        step.validate_for(model)  # each step checks what its own fields ask of the model
    seen_quantize = False
    for step in recipe.steps:
        if seen_quantize and (step.prunes or step.quantizes):
            raise UserInputError(f"step {step.method!r} comes after quantization; prune first, then quantize")
        seen_quantize |= step.quantizes
    if sum(step.prunes for step in recipe.steps) > 1:
        raise UserInputError("a recipe may prune only once; use a single pruning step")


def _check_seqlen(model: nn.Module, seqlen: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise UserInputError(
            f"calibration seqlen={seqlen} exceeds the model's max_position_embeddings={limit}; use seqlen <= {limit}"
        )


def prepare_recipe(
    model: nn.Module,
    config: CompressionConfig | Recipe | list[CompressionConfig] | str,
    *,
    tokenizer=None,
    calibration: CalibrationConfig | None = None,
    calibration_ids: torch.Tensor | None = None,
) -> tuple[Recipe, torch.Tensor | None]:
    """The recipe ``config`` names, checked against ``model`` (every check that can fail, before any work), and its
    calibration windows (sampled with ``tokenizer`` unless given); the recipe then records the corpus that was read.
    ``model`` may live on the meta device (only its structure is read)."""
    if isinstance(config, str):
        config = preset_steps(config)  # an unknown name lists the presets
    if isinstance(config, CompressionConfig):
        recipe = Recipe([config])
    elif isinstance(config, list):
        recipe = Recipe(config)
    elif isinstance(config, Recipe):
        recipe = config
    else:
        raise UserInputError(f"compress_ expects a compression config, a Recipe or a preset name, got {type(config).__name__}")
    if calibration is not None:
        recipe = Recipe(recipe.steps, calibration)
    _validate(model, recipe)

    if any(step.needs_calibration for step in recipe.steps) and calibration_ids is None:
        _check_seqlen(model, recipe.calibration.seqlen)
        if tokenizer is None:
            raise UserInputError("this recipe needs calibration data; pass tokenizer= (or calibration_ids=)")
        c = recipe.calibration
        dataset, split = training_corpus(c.dataset, c.split)  # C4 unreachable: the offline sample, said in one line
        if (dataset, split) != (c.dataset, c.split):
            recipe = Recipe(recipe.steps, dataclasses.replace(c, dataset=dataset, split=split))  # record what ran
        calibration_ids = calibration_batches(dataset, tokenizer, c.nsamples, c.seqlen, seed=c.seed, split=split)
    if calibration_ids is not None:
        if calibration_ids.dim() != 2 or calibration_ids.numel() == 0:
            raise UserInputError(f"calibration_ids must be a non-empty (nsamples, seqlen) tensor, got shape {tuple(calibration_ids.shape)}")
        _check_seqlen(model, calibration_ids.shape[1])
    return recipe, calibration_ids


def record_recipe(model: nn.Module, recipe: Recipe) -> None:
    """Writes ``recipe`` into ``model.config`` (after any recipe an earlier compression recorded there)."""
    previous = getattr(model.config, RECIPE_CONFIG_KEY, None)
    recorded = recipe.to_dict()
    if previous:
        recorded["steps"] = list(previous.get("steps", [])) + recorded["steps"]
    setattr(model.config, RECIPE_CONFIG_KEY, recorded)


def compress_(
    model: nn.Module,
    config: CompressionConfig | Recipe | list[CompressionConfig] | str,
    *,
    tokenizer=None,
    calibration: CalibrationConfig | None = None,
    calibration_ids: torch.Tensor | None = None,
    pack: bool = True,
    progress: bool = True,
) -> CompressionResult:
    """Compresses ``model`` in place with one step or a recipe, and records the recipe in ``model.config``.

    Args:
        model (`PreTrainedModel`): a causal LM (Llama family, Qwen2, Mistral, OPT, GPT-2 style).
        config (`CompressionConfig`, `Recipe`, a list of steps, or a preset name such as ``"gptq-w4-g64"``): what to
            do (:func:`~hf_compress_prompt.compressors.presets.list_presets` names the presets).
        tokenizer (*optional*): used to build calibration windows from ``calibration.dataset``.
        calibration (`CalibrationConfig`, *optional*): overrides the recipe's calibration settings.
        calibration_ids (`torch.LongTensor` of shape `(nsamples, seqlen)`, *optional*): calibration tokens to use
            directly instead of sampling them with ``tokenizer``.
        pack (`bool`, *optional*, defaults to `True`): replace each quantized or pruned linear by its packed runtime
            module (:mod:`hf_compress_prompt.nn`) and attach the ``quantization_config``, so ``save_pretrained``
            writes the packed checkpoint; `False` leaves dense (fake-quantized / zeroed) weights.
        progress (`bool`, *optional*, defaults to `True`): progress bars.

    Returns:
        `CompressionResult`
    """
    recipe, calibration_ids = prepare_recipe(model, config, tokenizer=tokenizer, calibration=calibration,
                                             calibration_ids=calibration_ids)

    was_training = model.training
    model.eval()
    state = CompressionState(calibration_ids)
    try:
        for step in recipe.steps:
            report = StepReport(step.method)
            start = time.perf_counter()
            _HANDLERS[type(step)](model, step, state, report, recipe, progress)
            report.seconds = time.perf_counter() - start
            state.reports.append(report)
            logger.info("%s took %.1f s", step.method, report.seconds)
    finally:
        model.train(was_training)

    record_recipe(model, recipe)
    result = CompressionResult(recipe, state.reports, state.by_name(model, state.masks), state.by_name(model, state.quantized))
    if pack:
        pack_model(model, result)
    return result
