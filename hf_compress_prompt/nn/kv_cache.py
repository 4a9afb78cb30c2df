"""A key/value cache that appends in place.

transformers' ``DynamicCache`` appends a decode step's keys and values with ``torch.cat``, which copies the whole
cache of every layer at every step: at batch 8 with a few hundred cached positions that is ~100 MB of copying (and
fresh allocations) per generated token on SmolLM2, comparable to the linear layers' work. :class:`GrowingCache`
keeps each layer's keys and values in a buffer with spare room, grown geometrically, and writes only the new
positions; what attention sees is a view of the filled part. Everything else is ``DynamicCache``'s (it is one),
so ``generate``, cropping, beam reordering and batch selection work unchanged: when one of those replaces a layer's
tensors, the next append adopts them into a new buffer.

The price is memory: up to twice the cached positions are allocated (the spare room).

    from hf_compress_prompt.nn import GrowingCache, use_growing_cache
    out = model.generate(ids, cache=GrowingCache(config=model.config), max_new_tokens=128)  # past_key_values= before 5.24
    use_growing_cache(model)  # or: every later generate builds one where transformers would build a DynamicCache

Models loaded through this package's quantization method (``from_pretrained`` of a compressed folder) have
:func:`use_growing_cache` applied; ``use_growing_cache(model, False)`` restores transformers' default.
"""

from __future__ import annotations

import functools
import types

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["GrowingCache", "GrowingLayer", "use_growing_cache", "uses_growing_cache"]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose appends write into a buffer of spare capacity instead of concatenating.

    Args:
        granularity (`int`, *optional*, defaults to 128): capacities are multiples of this many positions.
    """

    def __init__(self, granularity: int = 128, **kwargs):
        super().__init__(**kwargs)
        self.granularity = granularity
        self._key_buffer: torch.Tensor | None = None  # (B, kv_heads, capacity, head_dim)
        self._value_buffer: torch.Tensor | None = None

    def _owns(self) -> bool:
        """Whether ``keys``/``values`` are still the leading part of this layer's buffers (nothing replaced them)."""
        buffers = (self._key_buffer, self._value_buffer)
        if buffers[0] is None or self.keys is None or self.keys.dim() != 4:
            return False
        return all(
            t.data_ptr() == b.data_ptr() and t.stride() == b.stride() and t.shape[:2] == b.shape[:2]
            and t.shape[3] == b.shape[3]
            for t, b in zip((self.keys, self.values), buffers)
        )

    def _reallocate(self, length: int, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New buffers of at least ``needed`` positions (twice the old capacity when growing an owned buffer),
        holding the ``length`` positions cached so far."""
        old = self._key_buffer.shape[2] if self._owns() else 0
        capacity = _round_up(max(needed, 2 * old), self.granularity)
        buffers = []
        for current, incoming in ((self.keys, key_states), (self.values, value_states)):
            buffer = incoming.new_empty((*incoming.shape[:2], capacity, incoming.shape[3]))  # (B, h, capacity, d)
            if length:
                buffer[:, :, :length].copy_(current)
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[2] if self.keys is not None and self.keys.dim() == 4 else 0
        needed = length + key_states.shape[2]
        if not self._owns() or needed > self._key_buffer.shape[2]:
            self._reallocate(length, needed, key_states, value_states)
        self._key_buffer[:, :, length:needed].copy_(key_states)
        self._value_buffer[:, :, length:needed].copy_(value_states)
        self.keys = self._key_buffer[:, :, :needed]  # views: attention reads the filled part in place
        self.values = self._value_buffer[:, :, :needed]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers are :class:`GrowingLayer` (sliding-window and other special
    layers stay as transformers builds them). Takes ``DynamicCache``'s arguments."""

    def __init__(self, *args, granularity: int = 128, **kwargs):
        super().__init__(*args, **kwargs)
        if self.layer_class_to_replicate is DynamicLayer:  # layers are created as the model first reaches them
            self.layer_class_to_replicate = functools.partial(GrowingLayer, granularity)
        self.layers = [self._growing(layer, granularity) if type(layer) is DynamicLayer else layer
                       for layer in self.layers]

    @staticmethod
    def _growing(layer: DynamicLayer, granularity: int) -> GrowingLayer:
        growing = GrowingLayer(granularity)
        if layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4:  # built with data
            growing.update(layer.keys, layer.values)
        return growing


_ORIGINAL = "_hf_compress_prompt_prepare_cache"


def _prepare_cache_for_generation(model, generation_config, model_kwargs, *args, **kwargs):
    result = getattr(model, _ORIGINAL)(generation_config, model_kwargs, *args, **kwargs)
    for name in ("cache", "past_key_values"):  # the keyword was renamed in transformers 5.24
        cache = model_kwargs.get(name)
        # Only the cache transformers builds by default: not a caller's, an offloaded, static or quantized one, and
        # not an assisted-generation draft model's (whose cache records its past for rollback).
        if (type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False)
                and not getattr(cache, "offloading", False) and cache.get_seq_length() == 0
                and not getattr(generation_config, "is_assistant", False)):
            model_kwargs[name] = GrowingCache(config=model.config.get_text_config(decoder=True))
    return result


def use_growing_cache(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Makes ``model.generate`` build a :class:`GrowingCache` wherever transformers would build its default
    ``DynamicCache`` (no cache passed, ``cache_implementation`` unset or ``"dynamic"``); a cache the caller passes
    and every other ``cache_implementation`` are left alone. Tokens and scores are the same as with
    ``DynamicCache``; decoding copies less. ``enabled=False`` undoes it. Returns ``model``.

    Works by wrapping the instance's ``_prepare_cache_for_generation`` (transformers' private hook that builds the
    cache); a transformers without it leaves the model unchanged.
    """
    wrapped = _ORIGINAL in model.__dict__
    if enabled and not wrapped and hasattr(model, "_prepare_cache_for_generation"):
        model.__dict__[_ORIGINAL] = model._prepare_cache_for_generation
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
    elif not enabled and wrapped:
        model.__dict__.pop("_prepare_cache_for_generation", None)
        model.__dict__.pop(_ORIGINAL)
    return model


def uses_growing_cache(model: torch.nn.Module) -> bool:
    """Whether :func:`use_growing_cache` is in effect on ``model``."""
    return _ORIGINAL in model.__dict__
