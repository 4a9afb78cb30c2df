"""Serving a model with its recovery prompt through vLLM's ``prompt_embeds`` input.

vLLM no longer runs prompt adapters; it takes the embeddings of a whole prompt instead, offline as
``llm.generate({"prompt_embeds": tensor})`` (``LLM(..., enable_prompt_embeds=True)``) and on its OpenAI-compatible
server (``vllm serve MODEL --enable-prompt-embeds``) as the ``prompt_embeds`` field of a ``/v1/completions``
request: base64 of the ``torch.save`` bytes of the tensor, read back with ``torch.load(..., weights_only=True)``,
a 2D ``(seq, hidden)`` tensor of a floating-point dtype (cast there to the model's dtype). :func:`prompt_embeds`
builds that tensor for each text, with the recovery prompt's rows first, exactly as this package's own runtime
applies it (:mod:`hf_compress_prompt.recovery.runtime`); :func:`encode_for_server` and :func:`completion_request`
write it for the server.

    >>> embeds = prompt_embeds(model, tokenizer, ["The capital of France is"])
    >>> llm.generate([{"prompt_embeds": e} for e in embeds], SamplingParams(max_tokens=16))
    >>> requests.post(f"{url}/v1/completions", json=completion_request(name, embeds[0], max_tokens=16))
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import UserInputError
from .recovery.io import PROMPT_SUBFOLDER, load_recovery_prompt
from .recovery.prefix import RecoveryPrefix
from .recovery.prompt import RecoveryPrompt
from .recovery.runtime import recovery_prompt_of

__all__ = ["completion_request", "encode_for_server", "prompt_embeds"]

Messages = list[dict]  # a chat: [{"role": "user", "content": "..."}, ...]
# Fields of a completions request that vLLM refuses together with prompt_embeds, or that would add a second prompt.
_NOT_WITH_EMBEDS = ("prompt", "prompt_embeds", "echo", "suffix", "prompt_logprobs")


def prompt_embeds(
    model_or_prompt: nn.Module | RecoveryPrompt | str | os.PathLike,
    tokenizer,
    texts: str | Messages | Sequence[str | Messages],
    *,
    chat: bool = False,
    embeddings: nn.Module | torch.Tensor | None = None,
    add_special_tokens: bool | None = None,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """The input vLLM takes as ``prompt_embeds`` for each text: the recovery prompt's rows, then the embeddings of
    the text's tokens.

    The prompt comes before every token, the BOS token included: ``[prompt (n rows); BOS; text tokens]``, the
    tokens as the tokenizer gives them. That is how this package applies the prompt: the forward, ``generate`` and
    ``pipeline`` of a model with a prompt attached take the ids as tokenized (``tokenizer(text)``, BOS and all, as
    the demo and ``pipeline`` tokenize; ``apply_chat_template`` for a chat) and put the prompt at positions
    ``0..n-1`` before all of them, as PEFT's prompt tuning that trained it prepends it to the whole ``input_ids``.
    With ``chat=True`` the chat template is applied first (with ``add_generation_prompt=True``, as ``pipeline``
    does for a chat), so the prompt also goes before the template's BOS and its first turn. vLLM does not
    tokenize ``prompt_embeds`` (it adds no BOS), so the BOS is in the tensor.

    Args:
        model_or_prompt (`PreTrainedModel`, [`RecoveryPrompt`], `str` or `os.PathLike`):
            a model with a recovery prompt attached (``hf_compress_prompt.from_pretrained`` of a folder with
            ``recovery_prompt/``, or :func:`~hf_compress_prompt.recovery.attach_recovery_prompt`; enabled or
            not), a [`RecoveryPrompt`], or a saved prompt: a ``recovery_prompt/`` folder (PEFT format), a model
            folder holding one, or a Hub repo of one. Without a model, ``embeddings`` is needed.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        texts (`str`, a chat, or a sequence of them): the prompts, each a `str`, or with ``chat=True`` a `str`
            (one user turn) or a list of chat messages (``{"role": ..., "content": ...}``); a single `str` or
            chat is one prompt.
        chat (`bool`, *optional*, defaults to `False`): apply ``tokenizer.apply_chat_template(...,
            add_generation_prompt=True)`` to each text.
        embeddings (`nn.Module` or `torch.Tensor`, *optional*): the model's input embeddings, as the module
            (``model.get_input_embeddings()``, called on the ids) or its weight ``(vocab_size, hidden_size)``
            (indexed by the ids); only without a model, which brings its own.
        add_special_tokens (`bool`, *optional*): passed to the tokenizer for plain texts; `None` keeps the
            tokenizer's default (what ``tokenizer(text)`` and ``pipeline`` do). A chat template writes its own
            special tokens, so it is refused with ``chat=True``.
        dtype (`torch.dtype`, *optional*): the dtype of the tensors; defaults to the embeddings' (the model's).
            The prompt is rounded to the embeddings' dtype first, as the runtime does.

    Returns:
        `list[torch.Tensor]`: one tensor of shape `(num_virtual_tokens + tokens, hidden_size)` per text, on the
        CPU (where vLLM takes them), without gradient.

    Raises:
        UserInputError: a model without a recovery prompt, or with a recovery prefix (keys and values in every layer
            cannot be sent as ``prompt_embeds``); a prompt without ``embeddings`` (or a model with them);
            the prompt's hidden size (or vocabulary) not the embeddings'; no texts, an empty text or chat, or one
            that gives no tokens; a chat without ``chat=True`` or without a chat template.
    """
    prompt, embed, weight = _prompt_and_embeddings(model_or_prompt, embeddings)
    if chat and add_special_tokens is not None:
        raise UserInputError("add_special_tokens applies to plain texts; with chat=True the chat template writes the "
                             "special tokens (pass chat=False to tokenize rendered text yourself)")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserInputError("chat=True, but the tokenizer has no chat template; pass chat=False, or set "
                             "tokenizer.chat_template")
    vocab = weight.shape[0]
    out = []
    with torch.no_grad():
        for i, item in enumerate(_items(texts, chat)):
            ids = _token_ids(tokenizer, item, chat, add_special_tokens)
            if not ids:
                raise UserInputError(f"texts[{i}] gives no tokens; vLLM would see the recovery prompt alone")
            if max(ids) >= vocab:
                raise UserInputError(f"texts[{i}] has token id {max(ids)}, beyond the {vocab} rows of the embeddings: "
                                     "the tokenizer is not the model's")
            tokens = embed(torch.tensor(ids, dtype=torch.long, device=weight.device))  # (L, hidden)
            row = prompt.prepend(tokens.unsqueeze(0))[0]  # (n + L, hidden)
            out.append(row.to(device="cpu", dtype=dtype or row.dtype))
    return out


def _prompt_and_embeddings(model_or_prompt, embeddings) -> tuple[RecoveryPrompt, Callable, torch.Tensor]:
    """The prompt, a function from ids ``(L,)`` to their embeddings ``(L, hidden)``, and the embedding weight."""
    if isinstance(model_or_prompt, nn.Module):
        prompt = recovery_prompt_of(model_or_prompt)
        if prompt is None:
            raise UserInputError("this model has no recovery prompt attached; load a folder saved with one "
                                 "(hf_compress_prompt.from_pretrained) or attach one with attach_recovery_prompt")
        if embeddings is not None:
            raise UserInputError("pass embeddings only with a RecoveryPrompt or a saved prompt; a model uses its own "
                                 "(model.get_input_embeddings())")
        embeddings = model_or_prompt.get_input_embeddings()
    else:
        if isinstance(model_or_prompt, (RecoveryPrompt, RecoveryPrefix)):
            prompt = model_or_prompt
        elif isinstance(model_or_prompt, (str, os.PathLike)):
            folder = Path(model_or_prompt) / PROMPT_SUBFOLDER
            prompt = load_recovery_prompt(folder if folder.is_dir() else model_or_prompt)
        else:
            raise UserInputError(f"model_or_prompt is a {type(model_or_prompt).__name__}; pass a model with a recovery "
                                 "prompt attached, a RecoveryPrompt, or the path of a saved recovery_prompt/ folder")
        if embeddings is None and not isinstance(prompt, RecoveryPrefix):
            raise UserInputError("without a model, pass embeddings: the model's input embedding module "
                                 "(model.get_input_embeddings()) or its weight (vocab_size, hidden_size)")
    if isinstance(prompt, RecoveryPrefix):
        raise UserInputError("a recovery prefix (method PREFIX) is keys and values in every layer, not input "
                             "embeddings: vLLM's prompt_embeds cannot carry it; serve it with this package's generate "
                             "(hcp.from_pretrained), or train method=PROMPT for vLLM")
    if isinstance(embeddings, torch.Tensor):
        weight, embed = embeddings, embeddings.__getitem__  # (vocab, hidden)[ids] -> (L, hidden)
    elif isinstance(embeddings, nn.Module) and isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        weight, embed = embeddings.weight, embeddings
    else:
        raise UserInputError(f"embeddings is a {type(embeddings).__name__}; pass the model's input embedding module "
                             "(with a weight) or its weight tensor (vocab_size, hidden_size)")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise UserInputError(f"the embedding weight is a {weight.dtype} tensor of shape {tuple(weight.shape)}; it "
                             "should be floating point, (vocab_size, hidden_size)")
    if prompt.embedding.dim() != 2 or prompt.embedding.shape[1] != weight.shape[1]:
        raise UserInputError(f"the recovery prompt has shape {tuple(prompt.embedding.shape)}, the embeddings hidden "
                             f"size {weight.shape[1]}: it was trained for another model "
                             f"({prompt.metadata.get('base_model') or 'unknown base model'})")
    vocab = prompt.metadata.get("vocab_size")
    if vocab is not None and vocab != weight.shape[0]:
        raise UserInputError(f"the recovery prompt was trained with a vocabulary of {vocab} tokens, the embeddings "
                             f"have {weight.shape[0]} rows: a different tokenizer")
    return prompt, embed, weight


def _items(texts, chat: bool) -> list[str | Messages]:
    """``texts`` as a list of prompts (a single `str` or chat is one), each checked."""
    if isinstance(texts, str) or (chat and isinstance(texts, list) and texts and isinstance(texts[0], dict)):
        texts = [texts]
    items = list(texts)
    if not items:
        raise UserInputError("texts is empty; pass at least one text")
    for i, item in enumerate(items):
        if isinstance(item, str) or (chat and isinstance(item, (list, tuple))):
            if not item:
                raise UserInputError(f"texts[{i}] is empty; each text needs at least one character (or message)")
        elif isinstance(item, (list, tuple, dict)):
            raise UserInputError(f"texts[{i}] is a {type(item).__name__} (chat messages?); pass chat=True to apply the "
                                 "chat template")
        else:
            raise UserInputError(f"texts[{i}] is a {type(item).__name__}; each text is a str"
                                 + (" or a list of chat messages" if chat else ""))
    return items


def _token_ids(tokenizer, item: str | Messages, chat: bool, add_special_tokens: bool | None) -> list[int]:
    """The ids this package's ``generate`` / ``pipeline`` would be given for ``item``."""
    if chat:
        messages = [{"role": "user", "content": item}] if isinstance(item, str) else list(item)
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    return list(tokenizer(item, **options)["input_ids"])


def encode_for_server(tensor: torch.Tensor) -> str:
    """The ``prompt_embeds`` field of a request to vLLM's OpenAI-compatible server: base64 of the
    ``torch.save`` bytes of ``tensor``, which the server reads back with ``torch.load(..., weights_only=True)``.

    Args:
        tensor (`torch.Tensor` of shape `(seq, hidden_size)`): a floating-point tensor, e.g. one of
            :func:`prompt_embeds`; the server casts it to the model's dtype.

    Returns:
        `str`: the base64 text (standard alphabet, padded).
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
        what = f"a {tensor.dtype} tensor of shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else (
            f"a {type(tensor).__name__}")
        raise UserInputError(f"prompt_embeds for vLLM is a floating-point (seq, hidden_size) tensor; got {what}")
    buffer = io.BytesIO()
    # clone: torch.save writes a view's whole storage (a slice of a larger tensor would send all of it)
    torch.save(tensor.detach().to("cpu").clone(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def completion_request(model_name: str, embeds: torch.Tensor | str | Sequence[torch.Tensor | str],
                       **sampling) -> dict:
    """The JSON body of a ``/v1/completions`` request to ``vllm serve MODEL --enable-prompt-embeds``.

    Args:
        model_name (`str`): the served model's name (``MODEL``, or its ``--served-model-name``).
        embeds (`torch.Tensor`, `str`, or a sequence of them): one prompt's tensor (from :func:`prompt_embeds`),
            or several for one completion each; a `str` is taken as already encoded (:func:`encode_for_server`).
        **sampling: the request's other fields, as the server names them (``max_tokens``, ``temperature``,
            ``top_p``, ``seed``, ``stop``, ...). ``prompt`` (it would add a second prompt), ``echo``, ``suffix`` and
            ``prompt_logprobs`` (refused by vLLM with prompt embeddings) are refused.

    Returns:
        `dict`: ``{"model": model_name, "prompt_embeds": ..., **sampling}``, ready for ``json.dumps``.
    """
    if not isinstance(model_name, str) or not model_name:
        raise UserInputError(f"model_name={model_name!r}; pass the name the server serves the model under")
    refused = sorted(set(sampling) & set(_NOT_WITH_EMBEDS))
    if refused:
        raise UserInputError(f"completion_request does not take {', '.join(refused)}: the prompt is the embeddings "
                             "(and vLLM refuses echo, suffix and prompt_logprobs with them)")
    if isinstance(embeds, (torch.Tensor, str)):
        encoded: str | list[str] = embeds if isinstance(embeds, str) else encode_for_server(embeds)
    else:
        encoded = [e if isinstance(e, str) else encode_for_server(e) for e in embeds]
        if not encoded:
            raise UserInputError("embeds is empty; pass at least one prompt's tensor")
    return {"model": model_name, "prompt_embeds": encoded, **sampling}
