"""A Llama whose layers differ in size: the model type that structured pruning produces.

Structured pruning (Compresso, one-shot head and channel pruning) leaves every decoder layer with its own number of
attention heads, key/value heads and FFN channels, and may shrink the hidden size; a standard ``LlamaConfig`` holds
one number of each. :class:`PrunedLlamaConfig` (``model_type="pruned_llama"``) adds the per-layer lists, and
:class:`PrunedLlamaForCausalLM` builds each layer to its own shape, so ``save_pretrained``, ``from_pretrained``,
``generate``, PEFT and the recovery prompt all work on it. Both are registered with ``AutoConfig`` and
``AutoModelForCausalLM`` when ``hf_compress_prompt`` is imported.

A layer may lose all its heads (its attention then adds nothing, and writes empty keys and values to the KV cache so
the cache's length stays right) or all its FFN channels. ``head_dim`` is stored explicitly (it no longer equals
``hidden_size // num_attention_heads`` once the hidden size is pruned). Static KV caches assume one key/value head
count for every layer and are not supported for non-uniform models; the default dynamic cache is.

    >>> config = PrunedLlamaConfig.from_llama(llama.config, layer_num_attention_heads=[9, 6, 3], ...)
    >>> model = PrunedLlamaForCausalLM(config)
    >>> to_llama(model)  # a plain LlamaForCausalLM, when every layer has the same sizes
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ..errors import UserInputError
from ..recovery.runtime import attach_saved_prompt

__all__ = ["MODEL_TYPE", "PrunedLlamaConfig", "PrunedLlamaForCausalLM", "from_llama", "register", "to_llama"]

MODEL_TYPE = "pruned_llama"
_LAYER_FIELDS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")


@strict
class PrunedLlamaConfig(LlamaConfig):
    r"""A ``LlamaConfig`` with per-layer sizes. ``num_attention_heads``, ``num_key_value_heads`` and
    ``intermediate_size`` keep the sizes of the model before pruning (the largest a layer may have).

    Args:
        layer_num_attention_heads (`list[int]`, *optional*): query heads of each layer (default: all).
        layer_num_key_value_heads (`list[int]`, *optional*): key/value heads of each layer; each must divide that
            layer's query heads (grouped-query attention), and is 0 exactly when the layer has no heads.
        layer_intermediate_size (`list[int]`, *optional*): FFN channels of each layer (0 removes the FFN).
    """

    model_type = MODEL_TYPE
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        n = self.num_hidden_layers
        defaults = (self.num_attention_heads, self.num_key_value_heads, self.intermediate_size)
        for name, default in zip(_LAYER_FIELDS, defaults):
            if getattr(self, name) is None:
                setattr(self, name, [default] * n)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Per-layer sizes must fit the layer count and grouped-query attention (replaces Llama's check that the
        hidden size divides by the head count: ``head_dim`` is explicit here)."""
        n = self.num_hidden_layers
        for name in _LAYER_FIELDS:
            values = getattr(self, name)
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries; the model has num_hidden_layers={n}")
            if any(v < 0 for v in values):
                raise ValueError(f"{name}={values} must not be negative")
        for i, (heads, kv) in enumerate(zip(self.layer_num_attention_heads, self.layer_num_key_value_heads)):
            if (heads == 0) != (kv == 0) or (kv and heads % kv):
                raise ValueError(f"layer {i}: {heads} query heads and {kv} key/value heads; the key/value heads must "
                                 "divide the query heads (and be 0 only when there are no heads)")

    @property
    def is_uniform(self) -> bool:
        """Every layer has the sizes a plain ``LlamaConfig`` describes."""
        return (set(self.layer_num_attention_heads) == {self.num_attention_heads}
                and set(self.layer_num_key_value_heads) == {self.num_key_value_heads}
                and set(self.layer_intermediate_size) == {self.intermediate_size})

    @classmethod
    def from_llama(cls, config: LlamaConfig, **changes) -> "PrunedLlamaConfig":
        """This config type for a Llama config, with ``changes`` (per-layer lists, ``hidden_size``...) applied."""
        values = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            values.pop(key, None)
        values["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(**{**values, **changes})

    def to_llama_config(self) -> LlamaConfig:
        """The plain ``LlamaConfig`` of a uniform model; an error names the first layer that differs otherwise."""
        if not self.is_uniform:
            sizes = list(zip(*(getattr(self, f) for f in _LAYER_FIELDS)))
            first = next(i for i, s in enumerate(sizes)
                         if s != (self.num_attention_heads, self.num_key_value_heads, self.intermediate_size))
            raise UserInputError(f"layer {first} has (heads, kv heads, FFN channels) = {sizes[first]}, not "
                                 f"{(self.num_attention_heads, self.num_key_value_heads, self.intermediate_size)}: "
                                 "a plain Llama config cannot hold per-layer sizes; keep model_type pruned_llama")
        values = self.to_dict()
        for key in ("model_type", "architectures", "transformers_version", *_LAYER_FIELDS):
            values.pop(key, None)
        try:
            return LlamaConfig(**values)
        except ValueError as error:
            raise UserInputError(f"a plain Llama config refuses these sizes ({error}); keep model_type pruned_llama")


class _NoAttention(nn.Module):
    """The attention of a layer whose heads were all pruned: adds nothing to the residual stream, and writes empty
    keys and values into the KV cache so its sequence length (read from any layer) stays right."""

    def __init__(self, layer_idx: int, head_dim: int):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            b, s = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, s, self.head_dim)  # (B, kv heads = 0, T, hs)
            cos, sin = position_embeddings if position_embeddings is not None else (None, None)
            cache.update(empty, empty, self.layer_idx, {"sin": sin, "cos": cos})
        return torch.zeros_like(hidden_states), None


class _NoMLP(nn.Module):
    """The FFN of a layer whose channels were all pruned."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _linear(in_features: int, out_features: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=like.device, dtype=like.dtype)


def _shape_layer(layer: nn.Module, config: PrunedLlamaConfig, index: int) -> None:
    """Rebuilds one decoder layer's projections to its own sizes (new, uninitialised weights)."""
    heads = config.layer_num_attention_heads[index]
    kv = config.layer_num_key_value_heads[index]
    channels = config.layer_intermediate_size[index]
    hidden, hd, attn = config.hidden_size, config.head_dim, layer.self_attn
    if heads == 0:
        layer.self_attn = _NoAttention(index, hd)
    elif (heads, kv) != (config.num_attention_heads, config.num_key_value_heads):
        like, bias = attn.q_proj.weight, config.attention_bias
        attn.q_proj = _linear(hidden, heads * hd, bias, like)
        attn.k_proj = _linear(hidden, kv * hd, bias, like)
        attn.v_proj = _linear(hidden, kv * hd, bias, like)
        attn.o_proj = _linear(heads * hd, hidden, bias, like)
        attn.num_key_value_groups = heads // kv
    mlp = layer.mlp
    if channels == 0:
        layer.mlp = _NoMLP()
    elif channels != config.intermediate_size:
        like, bias = mlp.gate_proj.weight, config.mlp_bias
        mlp.gate_proj = _linear(hidden, channels, bias, like)
        mlp.up_proj = _linear(hidden, channels, bias, like)
        mlp.down_proj = _linear(channels, hidden, bias, like)
        mlp.intermediate_size = channels


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with each decoder layer built to the sizes of :class:`PrunedLlamaConfig`."""

    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        for index, layer in enumerate(self.model.layers):
            _shape_layer(layer, config, index)
        self.post_init()  # initialise the rebuilt projections like the rest

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``LlamaForCausalLM.from_pretrained``, then the recovery prompt saved beside the weights (a folder's
        ``recovery_prompt/``, e.g. Compresso's collaborative prompt) is attached, as for compressed folders."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return attach_saved_prompt(model, pretrained_model_name_or_path)


def from_llama(model: LlamaForCausalLM) -> PrunedLlamaForCausalLM:
    """The same weights as a :class:`PrunedLlamaForCausalLM` (uniform sizes), ready for structured pruning."""
    return _rebuild(model, PrunedLlamaForCausalLM(PrunedLlamaConfig.from_llama(model.config)))


def to_llama(model: PrunedLlamaForCausalLM) -> LlamaForCausalLM:
    """The plain ``LlamaForCausalLM`` of a model whose layers all have the same sizes (same weights); an error
    naming the first odd layer otherwise."""
    return _rebuild(model, LlamaForCausalLM(model.config.to_llama_config()))


def _rebuild(source: nn.Module, target: nn.Module) -> nn.Module:
    """``target`` (same parameter names and shapes) holding ``source``'s weights, dtype, device and mode."""
    target.load_state_dict(source.state_dict())
    target.generation_config = source.generation_config
    return target.to(device=source.device, dtype=source.dtype).train(source.training)


def register() -> None:
    """Registers the config and model with ``AutoConfig`` / ``AutoModelForCausalLM`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE in CONFIG_MAPPING and CONFIG_MAPPING[MODEL_TYPE].__qualname__ != PrunedLlamaConfig.__qualname__:
        raise ValueError(f"model_type {MODEL_TYPE!r} is already registered to {CONFIG_MAPPING[MODEL_TYPE]!r}")
    AutoConfig.register(MODEL_TYPE, PrunedLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(PrunedLlamaConfig, PrunedLlamaForCausalLM, exist_ok=True)
