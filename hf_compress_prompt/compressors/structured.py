"""Structured pruning: removing attention heads, FFN channels and hidden dimensions from a Llama-family model.

:class:`StructurePlan` says what each layer keeps; :func:`apply_structure` builds the smaller model it describes as a
:class:`~hf_compress_prompt.models.pruned_llama.PrunedLlamaForCausalLM` (per-layer sizes), copying the kept rows and
columns. The result equals the original model with the removed structures zeroed out (tested):

- a removed head: its query rows and output-projection columns go; a key/value head goes with the last query head of
  its group (every kept group keeps the same number of query heads, as grouped-query attention needs);
- a removed FFN channel: its gate and up rows and its down-projection column;
- a removed hidden dimension: its column of the embeddings, of every projection that reads the residual stream and
  of the output head, and its row of every projection that writes it. The RMS norms then average over fewer
  dimensions; multiplying their weights by ``sqrt(d / d')`` and the epsilon by ``d / d'`` keeps them exact for a
  stream that was zero in the removed dimensions (which is what a hidden-dimension mask trains towards).

:func:`prune_structured` is the one-shot baseline: L2-magnitude scores (:mod:`~hf_compress_prompt.methods.
structure_scores`), the same fraction of heads and channels in every layer, sized to remove a target fraction of all
parameters (``criterion="random"`` for the random control).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import UserInputError
from ..methods.structure_scores import channel_scores, head_scores, keep_heads_per_group, keep_top
from ..models.pruned_llama import PrunedLlamaConfig, PrunedLlamaForCausalLM
from ..nn import has_packed_layers

__all__ = ["StructurePlan", "apply_structure", "check_prunable", "count_parameters", "plan_magnitude", "prune_structured"]


@dataclass
class StructurePlan:
    """What survives structured pruning: per layer, the kept query heads and FFN channels (indices into the model
    the plan is applied to), and the kept hidden dimensions (`None`: all)."""

    heads: list[list[int]]
    channels: list[list[int]]
    hidden: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_prunable(model: nn.Module) -> None:
    """Structured pruning here knows the Llama block (q/k/v/o attention, gated FFN, RMS norms); anything else is
    refused before any work."""
    from transformers import LlamaForCausalLM


    if not isinstance(model, LlamaForCausalLM):
        raise UserInputError(f"structured pruning supports Llama-family causal LMs (LlamaForCausalLM and the pruned "
                             f"models it makes); got {type(model).__name__}")
    if has_packed_layers(model):
        raise UserInputError("this model holds packed (quantized / sparse) layers; prune structures first, then "
                             "quantize or sparsify the smaller model")


def _layer_sizes(config) -> list[tuple[int, int, int]]:
    """(query heads, key/value heads, FFN channels) of each layer of a Llama or pruned-Llama config."""
    n = config.num_hidden_layers
    heads = getattr(config, "layer_num_attention_heads", None) or [config.num_attention_heads] * n
    kv = getattr(config, "layer_num_key_value_heads", None) or [config.num_key_value_heads or config.num_attention_heads] * n
    channels = getattr(config, "layer_intermediate_size", None) or [config.intermediate_size] * n
    return list(zip(heads, kv, channels))


def _check_plan(plan: StructurePlan, sizes: list[tuple[int, int, int]], hidden_size: int) -> list[list[int]]:
    """Validates ``plan`` against the model's sizes; returns the kept key/value heads of each layer."""
    if len(plan.heads) != len(sizes) or len(plan.channels) != len(sizes):
        raise UserInputError(f"the plan has {len(plan.heads)} head lists and {len(plan.channels)} channel lists; the "
                             f"model has {len(sizes)} layers")
    kept_kv = []
    for i, ((heads, kv, channels), keep_h, keep_c) in enumerate(zip(sizes, plan.heads, plan.channels)):
        for name, keep, size in (("heads", keep_h, heads), ("channels", keep_c, channels)):
            if sorted(set(keep)) != list(keep) or any(not 0 <= k < size for k in keep):
                raise UserInputError(f"layer {i}: kept {name} {keep} must be sorted distinct indices below {size}")
        size = heads // kv if kv else 0
        groups = {}
        for h in keep_h:
            groups.setdefault(h // size, []).append(h)
        if len({len(v) for v in groups.values()}) > 1:
            raise UserInputError(f"layer {i}: kept heads {keep_h} leave key/value groups of {size} with different "
                                 "counts; grouped-query attention needs the same number of heads in every kept group")
        kept_kv.append(sorted(groups))
    if plan.hidden is not None and (sorted(set(plan.hidden)) != list(plan.hidden) or not plan.hidden
                                    or any(not 0 <= k < hidden_size for k in plan.hidden)):
        raise UserInputError(f"kept hidden dimensions must be sorted distinct indices below {hidden_size}, not empty")
    return kept_kv


def _rows(index: list[int], block: int) -> torch.Tensor:
    """Row indices of the kept blocks (heads of ``block`` rows each)."""
    return torch.tensor([b * block + r for b in index for r in range(block)], dtype=torch.long)


@torch.no_grad()
def apply_structure(model: nn.Module, plan: StructurePlan) -> PrunedLlamaForCausalLM:
    """The smaller model ``plan`` describes, with the kept weights of ``model`` (which is left unchanged)."""
    check_prunable(model)
    config = model.config
    sizes = _layer_sizes(config)
    kept_kv = _check_plan(plan, sizes, config.hidden_size)
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d = config.hidden_size
    keep_d = torch.tensor(plan.hidden if plan.hidden is not None else range(d), dtype=torch.long)
    d_new = keep_d.numel()
    base = PrunedLlamaConfig.from_llama(config) if not isinstance(config, PrunedLlamaConfig) else config
    new_config = PrunedLlamaConfig.from_llama(
        base, hidden_size=d_new, head_dim=hd, rms_norm_eps=config.rms_norm_eps * d / d_new,
        layer_num_attention_heads=[len(h) for h in plan.heads], layer_num_key_value_heads=[len(k) for k in kept_kv],
        layer_intermediate_size=[len(c) for c in plan.channels],
        num_attention_heads=base.num_attention_heads, num_key_value_heads=base.num_key_value_heads,
        intermediate_size=base.intermediate_size,
    )
    norm_scale = math.sqrt(d / d_new)  # RMS over d' dimensions: weight * sqrt(d / d') restores the d-dim value
    source = model.state_dict()
    state = {}
    for name, tensor in source.items():
        parts = name.split(".")
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            state[name] = tensor[:, keep_d]
        elif name.endswith("norm.weight"):
            state[name] = tensor[keep_d] * norm_scale
        elif "layers" in parts:
            i = int(parts[parts.index("layers") + 1])
            leaf = parts[-2]
            heads, kv_heads = plan.heads[i], kept_kv[i]
            if leaf == "q_proj":
                state[name] = tensor[_rows(heads, hd)][:, keep_d] if parts[-1] == "weight" else tensor[_rows(heads, hd)]
            elif leaf in ("k_proj", "v_proj"):
                rows = _rows(kv_heads, hd)
                state[name] = tensor[rows][:, keep_d] if parts[-1] == "weight" else tensor[rows]
            elif leaf == "o_proj":
                state[name] = tensor[keep_d][:, _rows(heads, hd)] if parts[-1] == "weight" else tensor[keep_d]
            elif leaf in ("gate_proj", "up_proj"):
                rows = torch.tensor(plan.channels[i], dtype=torch.long)
                state[name] = tensor[rows][:, keep_d] if parts[-1] == "weight" else tensor[rows]
            elif leaf == "down_proj":
                cols = torch.tensor(plan.channels[i], dtype=torch.long)
                state[name] = tensor[keep_d][:, cols] if parts[-1] == "weight" else tensor[keep_d]
            else:
                raise UserInputError(f"structured pruning does not know the parameter {name!r}")
        else:
            raise UserInputError(f"structured pruning does not know the parameter {name!r}")
    state = {k: v for k, v in state.items() if v.numel() > 0}  # removed attention / FFN have no weights
    pruned = PrunedLlamaForCausalLM(new_config)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if new_config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"pruned state does not fit the pruned model: missing {missing}, unexpected {unexpected}")
    pruned.generation_config = model.generation_config
    return pruned.to(device=model.device, dtype=model.dtype).train(model.training)


def _parameter_counts(config, sizes: list[tuple[int, int, int]], hidden: int) -> tuple[int, list[int], list[int]]:
    """Parameters outside the blocks, and per layer those of attention and of the FFN (biases and norms included)."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    outside = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2) + hidden
    attn, ffn = [], []
    for heads, kv, channels in sizes:
        bias = (heads + 2 * kv) * hd + hidden if config.attention_bias else 0
        attn.append(hidden * hd * (2 * heads + 2 * kv) + bias + hidden)  # + input norm
        ffn.append(3 * hidden * channels + ((2 * channels + hidden) if config.mlp_bias else 0) + hidden)  # + norm
    return outside, attn, ffn


CRITERIA = ("l2", "random")


def plan_magnitude(model: nn.Module, fraction: float, criterion: str = "l2", seed: int = 0) -> StructurePlan:
    """One-shot plan removing ``fraction`` of all parameters through heads and FFN channels: every layer keeps the
    same number of query heads per key/value group and the same share of channels (the usual uniform one-shot
    baseline); the FFN share is solved so the total lands within one channel per layer. ``criterion``: ``l2`` keeps
    the structures with the largest weight norms, ``random`` a seeded random choice (LLM-Pruner found L2 worse than
    random on LLaMA; both are here to show it)."""
    check_prunable(model)
    if not 0 < fraction < 1:
        raise UserInputError(f"fraction={fraction!r} must lie in (0, 1)")
    if criterion not in CRITERIA:
        raise UserInputError(f"criterion={criterion!r}; use one of {', '.join(CRITERIA)}")
    generator = torch.Generator().manual_seed(seed)

    def scored(scores: torch.Tensor) -> torch.Tensor:
        return scores if criterion == "l2" else torch.rand(scores.shape, generator=generator)
    config = model.config
    sizes = _layer_sizes(config)
    d = config.hidden_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    outside, attn, ffn = _parameter_counts(config, sizes, d)
    total = outside + sum(attn) + sum(ffn)
    remove = fraction * total
    block_share = remove / (sum(attn) + sum(ffn))
    if block_share >= 1:
        raise UserInputError(f"removing {fraction:.0%} of all parameters needs more than every block holds "
                             f"({outside:,} of {total:,} are embeddings and norms)")
    plan_heads, removed = [], 0
    layers = model.model.layers
    for (heads, kv, _), layer in zip(sizes, layers):
        if heads == 0:
            plan_heads.append([])
            continue
        group = heads // kv
        per_group = max(0, min(group, round(group * (1 - block_share))))
        attn_module = layer.self_attn
        scores = scored(head_scores(attn_module.q_proj.weight, attn_module.o_proj.weight, hd))
        plan_heads.append(keep_heads_per_group(scores, kv, per_group))
        removed += 2 * d * hd * (heads - per_group * kv) + (2 * d * hd * kv if per_group == 0 else 0)
    per_channel = 3 * d
    channels_total = sum(c for _, _, c in sizes)
    drop = max(0, math.ceil((remove - removed) / per_channel))
    if drop > channels_total:
        raise UserInputError(f"removing {fraction:.0%} of all parameters would need more FFN channels than exist")
    plan_channels = []
    share = drop / channels_total
    for (_, _, channels), layer in zip(sizes, layers):
        if channels == 0:
            plan_channels.append([])
            continue
        mlp = layer.mlp
        scores = scored(channel_scores(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))
        plan_channels.append(keep_top(scores, channels - round(channels * share)))
    return StructurePlan(plan_heads, plan_channels)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prune_structured(model: nn.Module, fraction: float, criterion: str = "l2",
                     seed: int = 0) -> tuple[PrunedLlamaForCausalLM, StructurePlan]:
    """One-shot structured pruning (:func:`plan_magnitude`, ``l2`` or ``random``) to ``fraction`` fewer parameters;
    returns the smaller model and its plan. ``model`` is left unchanged."""
    plan = plan_magnitude(model, fraction, criterion, seed)
    return apply_structure(model, plan), plan
