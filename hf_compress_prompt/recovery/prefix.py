"""A recovery prefix: learned keys and values in every attention layer (prefix tuning, Li & Liang 2021; the deep
prompts of P-tuning v2), the deep sibling of :class:`~.prompt.RecoveryPrompt`.

A soft prompt is ``n`` input embeddings; what the layers see of it is the keys and values each layer computes from
them. A prefix learns those keys and values directly, ``n`` of them per layer: a prompt is the special case whose
keys and values the model's own layers compute (:func:`~.runtime.prefix_of_prompt`). Like PEFT's ``PrefixTuning``,
the keys carry no rotary embedding of their own; the tokens that follow sit at positions ``n..n+L-1``, as after a
prompt, so the runtime serves a prefix from the same once-filled key/value cache (:mod:`.runtime`).

Shapes: a prefix holds ``key_values`` of shape ``(num_layers, 2, kv_heads, n, head_dim)`` (keys at ``[:, 0]``,
values at ``[:, 1]``); PEFT keeps the same numbers flat, ``(n, num_layers * 2 * kv_heads * head_dim)``
(:meth:`RecoveryPrefix.from_peft` / :meth:`RecoveryPrefix.to_peft`), which is also what it saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserInputError

__all__ = ["PrefixLayout", "RecoveryPrefix", "check_prefix_length", "prefix_layout"]


@dataclass(frozen=True)
class PrefixLayout:
    """The key/value cache a prefix fills: ``num_layers`` layers of ``num_key_value_heads`` heads of ``head_dim``
    (with grouped-query attention the key/value heads, fewer than the query heads)."""

    num_layers: int
    num_key_value_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        """One layer's key (or value) width, ``kv_heads * head_dim``: PEFT's ``token_dim`` for prefix tuning."""
        return self.num_key_value_heads * self.head_dim


@dataclass
class RecoveryPrefix:
    """A trained prefix (every layer's keys and values) and what it was trained on.

    Attributes:
        key_values (`torch.Tensor` of shape `(num_layers, 2, kv_heads, num_virtual_tokens, head_dim)`): per layer,
            the keys (``[:, 0]``) and values (``[:, 1]``) the tokens attend to before their own.
        metadata (`dict`): base model, compression recipe, data, steps, best validation perplexity, vocabulary size.
    """

    key_values: torch.Tensor
    metadata: dict = field(default_factory=dict)

    @property
    def num_virtual_tokens(self) -> int:
        return self.key_values.shape[3]

    @property
    def layout(self) -> PrefixLayout:
        return PrefixLayout(self.key_values.shape[0], self.key_values.shape[2], self.key_values.shape[4])

    def layer_key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, ``(keys, values)`` for batch 1, each `(1, kv_heads, n, head_dim)` (the cache's layout)."""
        return [(layer[0].unsqueeze(0), layer[1].unsqueeze(0)) for layer in self.key_values]

    @classmethod
    def from_peft(cls, flat: torch.Tensor, layout: PrefixLayout, metadata: dict | None = None) -> RecoveryPrefix:
        """The prefix PEFT holds (and saves) as `(n, num_layers * 2 * token_dim)`: ``PeftModel.get_prompt`` views
        it as `(n, 2 * num_layers, heads, head_dim)` and gives layer ``i`` the keys ``2i`` and values ``2i + 1``."""
        expected = layout.num_layers * 2 * layout.token_dim
        if flat.dim() != 2 or flat.shape[1] != expected:
            raise UserInputError(f"a PEFT prefix for {layout.num_layers} layers of {layout.num_key_value_heads} key/value "
                                 f"heads of {layout.head_dim} is (num_virtual_tokens, {expected}); got "
                                 f"{tuple(flat.shape)}")
        n = flat.shape[0]
        per_layer = flat.reshape(n, 2 * layout.num_layers, layout.num_key_value_heads, layout.head_dim)  # (n, 2L, h, d)
        key_values = per_layer.permute(1, 2, 0, 3).reshape(  # (2L, h, n, d) -> (L, 2, h, n, d)
            layout.num_layers, 2, layout.num_key_value_heads, n, layout.head_dim)
        return cls(key_values.contiguous(), dict(metadata or {}))

    def to_peft(self) -> torch.Tensor:
        """The flat `(n, num_layers * 2 * token_dim)` tensor PEFT saves under ``prompt_embeddings``
        (:meth:`from_peft` inverted)."""
        layers, _, heads, n, dim = self.key_values.shape
        per_layer = self.key_values.reshape(2 * layers, heads, n, dim).permute(2, 0, 1, 3)  # (n, 2L, h, d)
        return per_layer.reshape(n, 2 * layers * heads * dim).contiguous()


def prefix_layout(model: nn.Module) -> PrefixLayout:
    """The key/value cache layout a prefix for ``model`` fills, as PEFT's ``PrefixTuningConfig`` computes it
    (``token_dim = kv_heads * head_dim``, ``num_attention_heads = kv_heads`` under grouped-query attention).

    Raises:
        UserInputError: a model whose cache a prefix cannot be served from, named with the reason: an
            encoder-decoder, a model without a dynamic cache (recurrent or static-only caches), a cache with
            other than full-attention layers (sliding windows, hybrid or linear attention), keys and values of
            different widths, or layers with other key/value heads than the config's (structured pruning).
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kind = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise UserInputError(f"method PREFIX serves decoder-only models; {kind} is an encoder-decoder (two caches); "
                             "use method PROMPT")
    supports = getattr(type(model), "_supports_default_dynamic_cache", None)
    if callable(supports) and not supports():
        raise UserInputError(f"method PREFIX fills a dynamic key/value cache, which {kind} does not use (a recurrent, "
                             "hybrid or static-only cache); use method PROMPT or LORA")
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    other = sorted({type(layer).__name__ for layer in DynamicCache(config=config).layers if type(layer) is not DynamicLayer})
    if other:
        fix = (f"; if the window ({config.sliding_window}) is longer than every sequence, set "
               "model.config.sliding_window = None" if getattr(config, "sliding_window", None) else "")
        raise UserInputError(f"method PREFIX needs a cache of full-attention layers; {kind}'s cache has "
                             f"{', '.join(other)} layers, which drop or transform the prefix's keys and values{fix}; "
                             "or use method PROMPT")
    if getattr(config, "kv_lora_rank", None) is not None or getattr(config, "v_head_dim", None) is not None:
        raise UserInputError(f"method PREFIX stores keys and values of one width; {kind} caches them with different "
                             "head sizes (latent attention); use method PROMPT")
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    per_layer = getattr(config, "layer_num_key_value_heads", None)
    if per_layer is not None and set(per_layer) != {kv_heads}:
        raise UserInputError(f"method PREFIX stores every layer's keys and values in one tensor of the config's "
                             f"num_key_value_heads={kv_heads} heads (PEFT's layout); this {kind} has "
                             f"{sorted(set(per_layer))} key/value heads in its layers (structured pruning); use method "
                             "PROMPT")
    layers = getattr(config, "num_hidden_layers", None)
    if not heads or not kv_heads or not layers:
        raise UserInputError(f"cannot read the attention layout of {kind} (num_attention_heads, num_key_value_heads, "
                             "num_hidden_layers) for method PREFIX; use method PROMPT")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return PrefixLayout(layers, kv_heads, head_dim)


def check_prefix_length(model: nn.Module, num_virtual_tokens: int, following: int = 1) -> None:
    """Refuses ``num_virtual_tokens`` below 1, or one that leaves fewer than ``following`` of the model's
    positions for the tokens after it (``max_position_embeddings``)."""
    if num_virtual_tokens < 1:
        raise UserInputError(f"num_virtual_tokens={num_virtual_tokens} must be >= 1")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and num_virtual_tokens + following > positions:
        raise UserInputError(
            f"num_virtual_tokens={num_virtual_tokens} with {following} token(s) after it exceeds the model's "
            f"max_position_embeddings={positions}; use num_virtual_tokens <= {positions - following}"
            + (" (or a shorter seqlen)" if following > 1 else ""))
