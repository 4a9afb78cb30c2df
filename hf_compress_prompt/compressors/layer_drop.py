"""Removing whole decoder layers (LayerChop / ShortGPT / Gromov et al.).

The model stays a standard transformers model: the kept blocks form a new ``ModuleList``, ``num_hidden_layers``
and any per-layer config lists (``layer_types``) shrink to match, and each kept block's ``layer_idx`` attributes are
renumbered so the KV cache indexes the right slots. It saves and reloads with plain transformers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserInputError
from ..methods.layer_scores import angular_distance, block_influence
from .blocks import capture_block_inputs, find_decoder_layers, run_block

__all__ = ["score_layers", "choose_layers_to_drop", "drop_layers"]

_MAX_SCORE_TOKENS = 8192  # token positions kept per layer boundary for scoring (memory stays ~ layers x 8192 x hidden)


@torch.no_grad()
def _boundary_states(model: nn.Module, calibration_ids: torch.Tensor, batch_size: int, progress: bool,
                     blocks: Iterable[nn.Module] | None = None) -> list[torch.Tensor]:
    """Hidden states at every layer boundary (input of layer 0 ... output of the last layer), each `(tokens, hidden)`
    on a fixed subsample of at most ``_MAX_SCORE_TOKENS`` token positions. ``blocks`` yields the decoder blocks in
    order (default: the model's own; the streaming path reads each from disk as it is reached)."""
    _, layers = find_decoder_layers(model)
    inputs = capture_block_inputs(model, layers, list(torch.split(calibration_ids, batch_size)))
    total = sum(h.shape[0] * h.shape[1] for h in inputs.hidden)
    keep = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:_MAX_SCORE_TOKENS].sort().values

    def sample(hidden: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([h.reshape(-1, h.shape[-1]) for h in hidden])  # (tokens, hidden)
        return flat[keep].float()

    states, hidden = [sample(inputs.hidden)], inputs.hidden
    for block in tqdm(layers if blocks is None else blocks, desc="score layers", unit="block", total=len(layers),
                      disable=not progress):
        hidden = run_block(block, inputs, hidden)
        states.append(sample(hidden))
    return states


def score_layers(
    model: nn.Module, calibration_ids: torch.Tensor, *, span: int = 1, score: str = "angular_distance",
    batch_size: int = 8, progress: bool = True, blocks: Iterable[nn.Module] | None = None,
) -> list[float]:
    """Score of removing layers ``[l, l + span)`` for every start ``l``: the angular distance or block influence
    between the hidden states entering layer ``l`` and leaving layer ``l + span - 1``. Lower = cheaper to drop."""
    states = _boundary_states(model, calibration_ids, batch_size, progress, blocks)
    fn = angular_distance if score == "angular_distance" else block_influence
    return [fn(states[l], states[l + span]) for l in range(len(states) - span)]


def choose_layers_to_drop(
    model: nn.Module, calibration_ids: torch.Tensor, count: int, *, score: str = "angular_distance",
    batch_size: int = 8, progress: bool = True, blocks: Iterable[nn.Module] | None = None,
) -> tuple[list[int], list[float]]:
    """Which ``count`` layers to remove, and the scores behind the choice.

    ``angular_distance``: the contiguous run of ``count`` layers whose input and output are closest in angle
    (Gromov et al.). ``block_influence``: the ``count`` single layers with the lowest influence (ShortGPT).
    Ties go to the earlier index, so the choice is deterministic.
    """
    if score == "angular_distance":
        scores = score_layers(model, calibration_ids, span=count, score=score, batch_size=batch_size, progress=progress,
                              blocks=blocks)
        start = min(range(len(scores)), key=lambda l: (scores[l], l))
        return list(range(start, start + count)), scores
    scores = score_layers(model, calibration_ids, span=1, score=score, batch_size=batch_size, progress=progress,
                          blocks=blocks)
    return sorted(sorted(range(len(scores)), key=lambda l: (scores[l], l))[:count]), scores


def drop_layers(model: nn.Module, indices: list[int]) -> nn.Module:
    """Removes the decoder layers at ``indices`` in place and returns the model."""
    path, layers = find_decoder_layers(model)
    n = len(layers)
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise UserInputError(f"layer indices {bad} are out of range for a model with {n} layers (0..{n - 1})")
    if len(set(indices)) >= n:
        raise UserInputError(f"cannot drop {len(set(indices))} of {n} layers; keep at least one")
    drop = set(indices)
    kept = [layer for i, layer in enumerate(layers) if i not in drop]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # attention modules index the KV cache by layer_idx
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList(kept))

    config = model.config
    for key, value in list(vars(config).items()):  # per-layer lists such as layer_types
        if isinstance(value, list) and len(value) == n and key not in ("architectures",):
            setattr(config, key, [v for i, v in enumerate(value) if i not in drop])
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int) and getattr(config, key) == n:
            setattr(config, key, len(kept))
    return model
