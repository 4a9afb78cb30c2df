"""Running a model with its recovery prompt (or prefix) attached: forward, ``generate`` and ``pipeline`` apply it,
and the prompt's key/value cache is computed once and reused (prefix caching).

A soft prompt is ``n`` learned input embeddings placed before every sequence. Its keys and values in each layer do
not depend on what follows (causal attention), so they are computed once per model dtype and device and copied
into the cache of every call; the tokens of the call then attend to them exactly as they would to the embeddings
prepended by PEFT's ``PeftModelForCausalLM`` (positions ``0..n-1`` for the prompt, ``n..`` for the tokens). Logits
come back for the tokens only (PEFT also returns the ``n`` prompt positions), and a loss from ``labels`` scores the
same ``L - 1`` next tokens as the model without a prompt (PEFT's also scores the first token, predicted from the last
virtual token), so perplexities with and without the prompt compare like for like.

A :class:`~.prefix.RecoveryPrefix` (prefix tuning: learned keys and values in every layer) is served the same way,
its keys and values taken as they are instead of computed from embeddings: the tokens attend to them at positions
``n..`` exactly as in PEFT's ``PrefixTuning`` forward, and decoding costs what a prompt of the same length costs.
Without a cache (``generate(use_cache=False)``) every forward gets a fresh cache holding the prefix.

``generate`` gives the tokens of that definition (the prompt's embeddings before the tokens, everything recomputed)
in every decoding mode transformers offers for input ids: greedy, sampling, beams, ``num_return_sequences``, left
padding, static caches, assisted and prompt-lookup decoding, ``use_cache=False``. ``n`` placeholder ids stand for the
prompt in the sequences transformers sees (positions and the attention mask count them); the first forward writes the
prompt's keys and values into the cache for the batch as transformers expanded it (beams, returned sequences) and
drops the placeholders, a forward without a cache gets the prompt's embeddings in their place. ``max_length`` and
``min_length``, token penalties, the caller's logits processors, stopping criteria and streamer count the caller's
ids only; the placeholders are cut from the output.

Attached with :func:`attach_recovery_prompt` (``from_pretrained`` does it for a checkpoint saved with one), it adds
``model.load_recovery_prompt(path)``, ``model.disable_recovery_prompt()`` and ``model.enable_recovery_prompt()``,
and replaces the methods the integrations registered with :func:`register_prompt_method`: ``save_pretrained``
(:mod:`hf_compress_prompt.integrations.checkpoints`: the prompt is saved beside the weights) and ``push_to_hub``
(:mod:`hf_compress_prompt.integrations.hub`: uploaded with them).
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import UserInputError
from ..nn.kv_cache import GrowingCache
from .io import PROMPT_SUBFOLDER, load_recovery_prompt
from .prefix import RecoveryPrefix, check_prefix_length, prefix_layout
from .prompt import RecoveryPrompt

__all__ = [
    "RecoveryPrefix",
    "RecoveryPrompt",
    "add_recovery_methods",
    "attach_recovery_prompt",
    "attach_saved_prompt",
    "detach_recovery_prompt",
    "disable_recovery_prompt",
    "enable_recovery_prompt",
    "original_method",
    "prefix_of_prompt",
    "recovery_prompt_of",
    "register_prompt_method",
]

_STATE = "_hcp_recovery"
_OWN_METHODS = ("generate", "load_recovery_prompt", "disable_recovery_prompt", "enable_recovery_prompt")
# Methods that an attached prompt replaces on the model, by name, registered by the layers above
# (:func:`register_prompt_method`); each is called as ``method(model, *args, **kwargs)``.
_PROMPT_METHODS: dict[str, Callable] = {}


class _State:
    """What a model with an attached prompt carries (``model._hcp_recovery``)."""

    def __init__(self, prompt: RecoveryPrompt | RecoveryPrefix):
        self.prompt = prompt
        self.enabled = True
        self.bypass = False  # set while the prompt's own cache is computed
        self.cache: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # (dtype, device) -> per-layer (k, v)
        self.hooks: list = []
        # While :func:`_generate` runs: every sequence starts with n placeholder ids, and ``generation_cache`` is the
        # cache handed to transformers (the prompt's keys and values go in at its first forward), `None` without one.
        self.generating = False
        self.generation_cache = None
        self.original_generate = None
        self.originals: dict[str, Callable] = {}  # name -> the model's method a registered one replaced


def register_prompt_method(name: str) -> Callable[[Callable], Callable]:
    """Registers ``method(model, *args, **kwargs)`` to replace ``model.<name>`` while a recovery prompt is attached
    (the model's own method stays reachable through :func:`original_method`). A second method for one name is an
    error, as is a name this module defines itself; the same function from a reloaded module replaces its old self.
    """
    if name in _OWN_METHODS:
        raise ValueError(f"{name!r} is a method attach_recovery_prompt defines itself; register another name")

    def decorator(method: Callable) -> Callable:
        existing = _PROMPT_METHODS.get(name)
        if existing is not None and existing.__qualname__ != method.__qualname__:
            raise ValueError(f"a recovery-prompt method {name!r} is already registered ({existing.__module__}."
                             f"{existing.__qualname__})")
        _PROMPT_METHODS[name] = method
        return method

    return decorator


def original_method(model: nn.Module, name: str) -> Callable:
    """``model.<name>`` as it was before the prompt was attached (for a method registered with
    :func:`register_prompt_method`)."""
    state = getattr(model, _STATE, None)
    if state is None or name not in state.originals:
        raise UserInputError(f"this model has no recovery prompt attached that replaced its {name}")
    return state.originals[name]


def recovery_prompt_of(model: nn.Module) -> RecoveryPrompt | RecoveryPrefix | None:
    """The prompt (or prefix) attached to ``model`` (enabled or not), else `None`."""
    state = getattr(model, _STATE, None)
    return state.prompt if state is not None else None


def _check(model: nn.Module, prompt: RecoveryPrompt | RecoveryPrefix) -> None:
    if isinstance(prompt, RecoveryPrefix):
        _check_prefix(model, prompt)
        tensor = prompt.key_values
    else:
        _check_prompt_shape(model, prompt)
        tensor = prompt.embedding
    check_prefix_length(model, prompt.num_virtual_tokens)
    vocab = prompt.metadata.get("vocab_size")
    if vocab is not None and vocab != model.config.vocab_size:
        raise UserInputError(
            f"the recovery prompt was trained with a vocabulary of {vocab} tokens, the model has "
            f"{model.config.vocab_size}: a different tokenizer"
        )
    if not torch.isfinite(tensor).all():
        raise UserInputError(f"the recovery {_kind(prompt)} holds NaN or infinite values")


def _kind(prompt: RecoveryPrompt | RecoveryPrefix) -> str:
    return "prefix" if isinstance(prompt, RecoveryPrefix) else "prompt"


def _check_prompt_shape(model: nn.Module, prompt: RecoveryPrompt) -> None:
    if prompt.embedding.dim() != 2 or prompt.embedding.shape[0] < 1:
        raise UserInputError(f"a recovery prompt is (num_virtual_tokens, hidden_size); got {tuple(prompt.embedding.shape)}")
    hidden = model.get_input_embeddings().embedding_dim
    if prompt.embedding.shape[1] != hidden:
        raise UserInputError(
            f"the recovery prompt has hidden size {prompt.embedding.shape[1]}, the model {hidden}: it was trained for "
            f"another model ({prompt.metadata.get('base_model', 'unknown base model')})"
        )


def _check_prefix(model: nn.Module, prefix: RecoveryPrefix) -> None:
    shape = tuple(prefix.key_values.shape)
    if len(shape) != 5 or shape[1] != 2 or shape[3] < 1:
        raise UserInputError(f"a recovery prefix is (num_layers, 2, kv_heads, num_virtual_tokens, head_dim); got {shape}")
    layout = prefix_layout(model)  # refuses a model whose cache a prefix cannot be served from
    if prefix.layout != layout:
        have, want = prefix.layout, layout
        raise UserInputError(
            f"the recovery prefix has {have.num_layers} layers of {have.num_key_value_heads} key/value heads of "
            f"{have.head_dim}, the model {want.num_layers} of {want.num_key_value_heads} of {want.head_dim}: it was "
            f"trained for another model ({prefix.metadata.get('base_model', 'unknown base model')})")


def attach_recovery_prompt(model: nn.Module, prompt: RecoveryPrompt | RecoveryPrefix | str | os.PathLike) -> nn.Module:
    """Makes ``model`` (a causal LM) run with ``prompt`` before every sequence; returns ``model``.

    Replaces a prompt attached earlier. ``prompt`` may be a :class:`RecoveryPrompt`, a :class:`RecoveryPrefix`
    (every layer's keys and values), or a folder / Hub repo saved by
    :func:`~hf_compress_prompt.recovery.save_recovery_prompt` (PEFT prompt-tuning or prefix-tuning format).

    Raises:
        UserInputError: hidden size (a prefix: layers, key/value heads, head size) or vocabulary do not match the
            model, the prompt leaves no room in the model's positions, it is not finite, or (a prefix) the model's
            cache cannot serve one.
    """
    if not isinstance(prompt, (RecoveryPrompt, RecoveryPrefix)):
        prompt = load_recovery_prompt(prompt)
    _check(model, prompt)
    state = getattr(model, _STATE, None)
    if state is not None:
        state.prompt, state.cache, state.enabled = prompt, {}, True
        return model
    state = _State(prompt)
    setattr(model, _STATE, state)
    state.hooks.append(model.register_forward_pre_hook(_pre_forward, with_kwargs=True))
    state.original_generate = model.generate
    model.generate = types.MethodType(_generate, model)
    for name, method in _PROMPT_METHODS.items():
        state.originals[name] = getattr(model, name)
        setattr(model, name, types.MethodType(method, model))
    model.load_recovery_prompt = types.MethodType(attach_recovery_prompt, model)
    model.disable_recovery_prompt = types.MethodType(disable_recovery_prompt, model)
    model.enable_recovery_prompt = types.MethodType(enable_recovery_prompt, model)
    return model


def add_recovery_methods(model: nn.Module) -> nn.Module:
    """Gives ``model`` a ``load_recovery_prompt(path_or_repo)`` method (models loaded through this package's
    quantization method have it even before a prompt is attached)."""
    if "load_recovery_prompt" not in model.__dict__:
        model.load_recovery_prompt = types.MethodType(attach_recovery_prompt, model)
    return model


def attach_saved_prompt(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """After ``from_pretrained(path)``: attaches the prompt saved in ``path/recovery_prompt/`` unless one is attached
    already (the quantizer attaches it for compressed folders), and gives the model ``load_recovery_prompt``."""
    path = Path(path)
    add_recovery_methods(model)
    if path.is_dir() and (path / PROMPT_SUBFOLDER).is_dir() and recovery_prompt_of(model) is None:
        attach_recovery_prompt(model, path / PROMPT_SUBFOLDER)
    return model


def detach_recovery_prompt(model: nn.Module) -> nn.Module:
    """Removes the prompt, its hooks and the methods :func:`attach_recovery_prompt` added."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    for hook in state.hooks:
        hook.remove()
    for name in (*_OWN_METHODS, *state.originals):
        model.__dict__.pop(name, None)
    delattr(model, _STATE)
    return model


def _set_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    state = getattr(model, _STATE, None)
    if state is None:
        raise UserInputError("this model has no recovery prompt attached")
    state.enabled = enabled
    return model


def disable_recovery_prompt(model: nn.Module) -> nn.Module:
    """Runs ``model`` without its prompt until :func:`enable_recovery_prompt` (the prompt stays attached)."""
    return _set_enabled(model, False)


def enable_recovery_prompt(model: nn.Module) -> nn.Module:
    """Runs ``model`` with its attached prompt again."""
    return _set_enabled(model, True)


def _active(model: nn.Module) -> _State | None:
    state = getattr(model, _STATE, None)
    return state if state is not None and state.enabled and not state.bypass else None


# ----- the prompt's key/value cache -----------------------------------------------------------------------------
def _prompt_kv(model: nn.Module, state: _State) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the prompt's keys and values for batch 1, ``(1, kv_heads, n, head_dim)``: computed once per
    model dtype and device (the prompt and the frozen weights decide them; a prefix is them already)."""
    embed = model.get_input_embeddings().weight
    key = (embed.dtype, embed.device)
    kv = state.cache.get(key)
    if kv is None:
        if isinstance(state.prompt, RecoveryPrefix):
            kv = [(k.to(device=embed.device, dtype=embed.dtype), v.to(device=embed.device, dtype=embed.dtype))
                  for k, v in state.prompt.layer_key_values()]
        else:
            kv = _embeddings_kv(model, state.prompt.embedding.to(device=embed.device, dtype=embed.dtype))
        state.cache = {key: kv}  # one entry: a dtype or device change rebuilds it
    return kv


def _embeddings_kv(model: nn.Module, embedding: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys and values the model computes from ``embedding`` `(n, hidden)` at positions ``0..n-1``,
    each `(1, kv_heads, n, head_dim)`, with any attached prompt bypassed."""
    state = getattr(model, _STATE, None)
    if state is not None:
        state.bypass = True
    try:
        with torch.no_grad():
            out = model(inputs_embeds=embedding.unsqueeze(0), use_cache=True)  # (1, n, hidden)
    finally:
        if state is not None:
            state.bypass = False
    return [(layer.keys, layer.values) for layer in _output_cache(out).layers]


def prefix_of_prompt(model: nn.Module, prompt: RecoveryPrompt, metadata: dict | None = None) -> RecoveryPrefix:
    """The prefix that acts on ``model`` exactly as ``prompt`` does: the keys and values its layers compute from the
    prompt's embeddings (positions ``0..n-1``), in float32. Prefix training starts from it (``init`` other than
    RANDOM), so a prefix starts where the prompt would.

    Raises:
        UserInputError: the prompt does not fit the model, or the model's cache cannot serve a prefix.
    """
    layout = prefix_layout(model)
    _check_prompt_shape(model, prompt)
    embed = model.get_input_embeddings().weight
    kv = _embeddings_kv(model, prompt.embedding.to(device=embed.device, dtype=embed.dtype))
    key_values = torch.stack([torch.stack([k[0], v[0]]) for k, v in kv]).float().cpu()  # (L, 2, h, n, d)
    prefix = RecoveryPrefix(key_values, dict(prompt.metadata if metadata is None else metadata))
    if prefix.layout != layout:
        raise UserInputError(f"{type(model).__name__}'s cache holds {prefix.layout}, its config says {layout}; "
                             "method PREFIX cannot serve this model")
    return prefix


def _new_cache(model: nn.Module, static_length: int | None = None):
    """An empty :class:`~hf_compress_prompt.nn.GrowingCache` (decode steps do not copy the prompt's positions again
    at every token as ``DynamicCache``'s concatenation would), or a static cache of ``static_length`` positions."""
    from transformers import StaticCache

    if static_length is None:
        return GrowingCache(config=model.config)
    return StaticCache(config=model.config, max_cache_len=static_length)


def _fill_prompt(model: nn.Module, state: _State, cache, batch: int):
    """Writes the prompt's keys and values for ``batch`` sequences into the empty ``cache``; returns it."""
    own = (lambda t: t) if isinstance(cache, GrowingCache) else torch.clone  # GrowingCache copies what it is given
    for i, (k, v) in enumerate(_prompt_kv(model, state)):
        cache.update(own(k.expand(batch, -1, -1, -1)), own(v.expand(batch, -1, -1, -1)), i)  # (B, h, n, d)
    return cache


def _prefix_cache(model: nn.Module, state: _State, batch: int, cache=None):
    """A cache holding the prompt's keys and values for ``batch`` sequences (``cache`` filled when given)."""
    return _fill_prompt(model, state, _new_cache(model) if cache is None else cache, batch)


# ----- forward --------------------------------------------------------------------------------------------------
@functools.cache
def _forward_parameters(cls: type) -> tuple[str, ...]:
    return tuple(inspect.signature(cls.forward).parameters)[1:]  # without self


def _cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward takes its cache by: ``cache`` from transformers 5.24, ``past_key_values``
    before (the old name still works there, with a deprecation warning)."""
    return "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"


def _output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _given_cache(kwargs: dict):
    """The cache passed under either name."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _as_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    if not args:
        return kwargs
    return {**dict(zip(_forward_parameters(type(model)), args)), **kwargs}


def _pre_forward(model: nn.Module, args: tuple, kwargs: dict):
    state = _active(model)
    if state is None:
        return None
    kwargs = _as_kwargs(model, args, kwargs)
    past = _given_cache(kwargs)
    if state.generating:
        return _pre_forward_in_generate(model, state, past, kwargs)
    if past is not None and past.get_seq_length() > 0:
        return None  # a continuation: the prompt is already in the cache
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    batch, n = tokens.shape[0], state.prompt.num_virtual_tokens
    kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    kwargs[_cache_kwarg(model)] = _prefix_cache(model, state, batch, past)
    kwargs["use_cache"] = True
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)  # (B, n + L)
    for name in ("position_ids", "cache_position"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name] + n
    return (), kwargs


def _pre_forward_in_generate(model: nn.Module, state: _State, past, kwargs: dict):
    """A forward of :func:`_generate`, whose sequences start with ``n`` placeholder ids (mask and positions count
    them: the prompt's positions are ``0..n-1``).

    Without a cache every forward gets the whole sequence: the placeholders' embeddings are replaced by the prompt's
    (prompt tuning by its definition); a prefix, which has no embeddings, goes into a fresh cache instead and the
    placeholders are dropped. With one, the first forward is the first to know the real batch (beams and
    ``num_return_sequences`` expand it inside transformers; assisted decoding sends the whole sequence): the
    prompt's keys and values go into the empty cache for that batch, and the placeholders are dropped from the
    inputs. Later forwards continue from the cache unchanged.
    """
    n = state.prompt.num_virtual_tokens
    tokens = kwargs.get("input_ids")
    if state.generation_cache is None:  # use_cache=False
        if tokens is None or tokens.shape[1] <= n:
            return None
        if isinstance(state.prompt, RecoveryPrefix):  # keys and values, no embeddings: a fresh cache holds them
            kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
            cache = kwargs[_cache_kwarg(model)] = _new_cache(model)
            return _without_placeholders(model, state, cache, kwargs, tokens.shape[0])
        embeds = model.get_input_embeddings()(tokens[:, n:])  # (B, L, hidden)
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = state.prompt.prepend(embeds)  # (B, n + L, hidden)
        return (), kwargs
    if past is not state.generation_cache or past.get_seq_length() > 0:
        return None  # a decode step: the prompt is already in the cache
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None or tokens.shape[1] <= n:
        raise UserInputError(f"generate with a recovery prompt of {n} virtual tokens needs a first forward of more "
                             f"than {n} positions; with prefill_chunk_size, make the chunks longer than {n}")
    return _without_placeholders(model, state, past, kwargs, tokens.shape[0])


def _without_placeholders(model: nn.Module, state: _State, cache, kwargs: dict, batch: int):
    """The forward's inputs without their ``n`` leading placeholders (their place taken by the prompt's keys and
    values, written into the empty ``cache`` for ``batch`` sequences); the mask keeps counting them as keys."""
    n = state.prompt.num_virtual_tokens
    for name in ("input_ids", "inputs_embeds", "position_ids", "cache_position"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name][..., n:] if name != "inputs_embeds" else kwargs[name][:, n:]
    kwargs["attention_mask"] = _drop_query_rows(kwargs.get("attention_mask"), n)
    _fill_prompt(model, state, cache, batch)
    return (), kwargs


def _drop_query_rows(mask, n: int):
    """The attention mask without the first ``n`` queries: a 2D mask (keys only) is unchanged; a 4D one
    ``(B, 1, queries, keys)`` (built by transformers for a static cache) loses its first ``n`` rows."""
    if isinstance(mask, dict):
        return {name: _drop_query_rows(m, n) for name, m in mask.items()}
    if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return mask
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        return mask[:, :, n:]
    raise UserInputError(f"generate with a recovery prompt does not support this attention mask ({type(mask).__name__}); "
                         "use attn_implementation='sdpa' or 'eager'")


# ----- generate -------------------------------------------------------------------------------------------------
def _generate(model: nn.Module, inputs: torch.Tensor | None = None, **kwargs):
    state = _active(model)
    original = getattr(model, _STATE).original_generate
    if state is None:
        return original(inputs, **kwargs)
    ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    if ids is None or kwargs.get("inputs_embeds") is not None:
        raise UserInputError("generate with a recovery prompt takes input_ids (inputs_embeds are not supported)")
    if state.generating:
        raise UserInputError("generate of a model with a recovery prompt was called from inside its own generate "
                             "(as its own assistant_model?); use a model without a recovery prompt as the assistant")
    given = _given_cache(kwargs)  # a Cache's truth value is its length: no `or` between the two names
    kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    if given is not None and given.get_seq_length() > 0:
        raise UserInputError("generate with a recovery prompt takes an empty cache (the prompt's keys and values are "
                             "written into it first); this one already holds positions")
    batch, n = ids.shape[0], state.prompt.num_virtual_tokens
    if (_setting(model, kwargs, "guidance_scale") or 1) != 1:
        raise UserInputError("generate with a recovery prompt does not support classifier-free guidance "
                             "(guidance_scale); disable the prompt (model.disable_recovery_prompt()) to use it")
    _count_placeholders_in_lengths(model, kwargs, n)
    _hide_placeholders_from_callbacks(kwargs, n)
    static_length = _static_length(model, kwargs, n + ids.shape[1])
    if given is not None and static_length is not None:
        raise UserInputError("pass either a cache or cache_implementation='static' to generate, not both")
    if _setting(model, kwargs, "use_cache") is False:
        if given is not None:
            raise UserInputError("pass either a cache or use_cache=False to generate, not both")
        cache = None  # every step recomputes [prompt; tokens] from embeddings (_pre_forward_in_generate)
    else:
        cache = given if given is not None else _new_cache(model, static_length)
    # n placeholder ids stand for the prompt (in the cache from the first forward on, or replaced by its embeddings
    # without a cache): positions and the attention mask count them, and they are cut from the output.
    placeholder = torch.zeros(batch, n, dtype=ids.dtype, device=ids.device)
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        mask = torch.ones_like(ids)
    default = model.generation_config.cache_implementation  # transformers would fill it in and refuse our cache
    model.generation_config.cache_implementation = None
    state.generating, state.generation_cache = True, cache
    overridden = model.__dict__.get("_get_logits_processor")
    model._get_logits_processor = functools.partial(_logits_processor_without_placeholders, model,
                                                    model._get_logits_processor, n)
    try:
        out = original(
            torch.cat([placeholder, ids], dim=1),
            attention_mask=torch.cat([mask.new_ones(batch, n), mask], dim=1),
            **({_cache_kwarg(model): cache} if cache is not None else {}),
            **kwargs,
        )
    finally:
        state.generating, state.generation_cache = False, None
        model.generation_config.cache_implementation = default
        if overridden is None:
            model.__dict__.pop("_get_logits_processor", None)
        else:
            model._get_logits_processor = overridden
    if isinstance(out, torch.Tensor):
        return out[:, n:]
    out.sequences = out.sequences[:, n:]
    return out


# What reads the token ids of the sequences: these see them without the n placeholders, as the caller wrote them.
# (Length-counting processors, MinLength, MinNewTokensLength, ExponentialDecayLengthPenalty, ForcedEOS,
# SuppressTokensAtBegin, are built by transformers from lengths that count the placeholders and see them.)
_READS_TOKENS = ("RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor", "SequenceBiasLogitsProcessor",
                 "NoBadWordsLogitsProcessor")


class _WithoutPlaceholders:
    """A logits processor or stopping criterion of the caller's, or one of :data:`_READS_TOKENS`, called with the
    sequences without their ``n`` leading placeholder ids; other attributes are the wrapped object's."""

    def __init__(self, inner, n: int):
        self.__dict__.update(inner=inner, n=n)

    def __getattr__(self, name):
        if "inner" not in self.__dict__:  # half-built (copy, pickle)
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)


class _ProcessorWithoutPlaceholders(_WithoutPlaceholders):
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.inner(input_ids[:, self.n:], scores)


class _CriterionWithoutPlaceholders(_WithoutPlaceholders):
    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return self.inner(input_ids[:, self.n:], scores, **kwargs)


class _StreamerWithoutPlaceholders(_WithoutPlaceholders):
    """A streamer whose first ``put`` (the input sequences) comes without the placeholders."""

    def put(self, value: torch.Tensor) -> None:
        if not self.__dict__.get("started"):
            self.__dict__["started"] = True
            value = value[..., self.n:]
        self.inner.put(value)


def _hide_placeholders_from_callbacks(kwargs: dict, n: int) -> None:
    """The caller's logits processors, stopping criteria, ``prefix_allowed_tokens_fn`` and streamer see the
    sequences they passed, not the placeholders."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    if kwargs.get("logits_processor"):
        kwargs["logits_processor"] = LogitsProcessorList(
            _ProcessorWithoutPlaceholders(p, n) for p in kwargs["logits_processor"])
    if kwargs.get("stopping_criteria"):
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            _CriterionWithoutPlaceholders(c, n) for c in kwargs["stopping_criteria"])
    if kwargs.get("prefix_allowed_tokens_fn") is not None:
        allowed = kwargs["prefix_allowed_tokens_fn"]
        kwargs["prefix_allowed_tokens_fn"] = lambda batch_id, sequence: allowed(batch_id, sequence[n:])  # (length,)
    if kwargs.get("streamer") is not None:
        kwargs["streamer"] = _StreamerWithoutPlaceholders(kwargs["streamer"], n)


def _logits_processor_without_placeholders(model: nn.Module, original, n: int, *args, **kwargs):
    """transformers' ``_get_logits_processor`` for sequences that start with ``n`` placeholders: what penalises
    or bans the tokens already in a sequence (:data:`_READS_TOKENS`; the encoder-repetition processors, given the
    inputs) does not count the placeholders, and padding is found after them."""
    kwargs = {**inspect.signature(original).bind_partial(*args, **kwargs).arguments}
    if kwargs.get("encoder_input_ids") is not None and kwargs["encoder_input_ids"].dim() == 2:
        kwargs["encoder_input_ids"] = kwargs["encoder_input_ids"][:, n:]
    model_kwargs = kwargs.get("model_kwargs")
    if model_kwargs is not None and model_kwargs.get("attention_mask") is not None:
        kwargs["model_kwargs"] = {**model_kwargs, "attention_mask": model_kwargs["attention_mask"][:, n:]}
    processors = original(**kwargs)
    for i, processor in enumerate(processors):
        if type(processor).__name__ in _READS_TOKENS:
            processors[i] = _ProcessorWithoutPlaceholders(processor, n)
    return processors


def _setting(model: nn.Module, kwargs: dict, name: str):
    """A generation setting as generate will read it: the keyword, else the caller's generation config, else the
    model's (`None` when none sets it)."""
    for source in (kwargs, vars(kwargs.get("generation_config") or model.generation_config),
                   vars(model.generation_config)):
        if source.get(name) is not None:
            return source[name]
    return None


def _count_placeholders_in_lengths(model: nn.Module, kwargs: dict, n: int) -> None:
    """``max_length`` and ``min_length`` count the caller's tokens; the sequences transformers sees also hold the
    ``n`` placeholders, so an absolute length set anywhere grows by ``n`` (``max_new_tokens`` and
    ``min_new_tokens`` count new tokens and are left alone; they take precedence when both are set)."""
    for name, relative in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if _setting(model, kwargs, relative) is not None and kwargs.get(name) is None:
            continue
        value = _setting(model, kwargs, name)
        if value is not None:
            kwargs[name] = value + n  # a keyword overrides either config; the caller's config is left as it was


def _static_length(model: nn.Module, kwargs: dict, start: int) -> int | None:
    """``None`` for a dynamic cache; for ``cache_implementation="static"`` (given directly, in a generation config
    or in the model's own), the static cache's length, prompt included. The setting is taken out of what reaches
    transformers (the caller builds the cache; transformers refuses a cache together with a cache_implementation)."""
    source = kwargs.get("generation_config") or model.generation_config
    implementation = kwargs.pop("cache_implementation", None) or source.cache_implementation
    if implementation not in (None, "dynamic", "static"):
        raise UserInputError("generate with a recovery prompt builds a dynamic or a static cache (the prompt's keys "
                             f"and values are copied into it); cache_implementation={implementation!r} is not "
                             "supported")
    if source is not model.generation_config and source.cache_implementation is not None:
        kwargs["generation_config"] = source = copy.deepcopy(source)  # the caller's config is left as it was
        source.cache_implementation = None
    if implementation != "static":
        return None
    merged = copy.deepcopy(source)
    merged.update(**{k: v for k, v in kwargs.items() if k in ("max_new_tokens", "max_length")})
    if merged.max_new_tokens is not None:
        return start + merged.max_new_tokens
    return max(merged.max_length, start + 1)

