"""The two things every knowledge-intensive task asks of a model: greedy continuations of text prompts, and the
log-likelihood of a few candidate continuations (MMLU's letters). Both batched with left padding and a KV cache, under bf16
autocast when asked, deterministic (greedy, fixed order), and blind to whether a recovery prompt is attached:
the attached prompt applies itself inside ``forward`` and ``generate``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...autocast import resolve_bf16
from ...errors import UserInputError

__all__ = ["TaskModel"]


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@dataclass
class TaskModel:
    """A causal LM and its tokenizer, as the tasks use them.

    Args:
        model (`PreTrainedModel`): dense, compressed or packed, with or without a recovery prompt.
        tokenizer: its tokenizer; a pad token is borrowed from EOS when it has none.
        batch_size (`int`, *optional*, defaults to 8): prompts per forward / generate call.
        autocast_bf16 (`bool`, *optional*): run under ``torch.autocast(dtype=bfloat16)``; `None` (the default):
            where bf16 matmuls are fast on the model's device (:func:`~hf_compress_prompt.autocast.bf16_matmul_is_fast`).
        max_length (`int`, *optional*): longest prompt in tokens; longer prompts keep their last tokens.
            Defaults to the model's ``max_position_embeddings`` less room for the answer.
        progress (`bool`, *optional*, defaults to `True`): tqdm bars.
        chat_template (`bool`, *optional*, defaults to `True`): generation tasks wrap their instruction in the
            tokenizer's chat template when it has one (:meth:`instruction`); an instruct model then answers the
            question instead of continuing a list. Log-likelihood tasks (MMLU) never do.
    """

    model: torch.nn.Module
    tokenizer: object
    batch_size: int = 8
    autocast_bf16: bool | None = None
    max_length: int | None = None
    progress: bool = True
    chat_template: bool = True

    def __post_init__(self):
        if self.tokenizer is None:
            raise UserInputError("the model has no tokenizer; pass one (tasks need text in and text out)")
        if self.batch_size < 1:
            raise UserInputError(f"batch_size={self.batch_size} must be at least 1")
        if getattr(self.tokenizer, "pad_token_id", None) is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.autocast_bf16 = resolve_bf16(self.autocast_bf16, _device(self.model))

    def instruction(self, text: str) -> str:
        """``text`` as a user turn of the tokenizer's chat template (when it has one and ``chat_template``)."""
        if self.chat_template and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    # ----- helpers ----------------------------------------------------------------------------------------------
    def _autocast(self):
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=_device(self.model).type, dtype=torch.bfloat16)

    def _limit(self, room: int) -> int:
        if self.max_length is not None:
            return self.max_length
        positions = getattr(self.model.config, "max_position_embeddings", 2048)
        return max(16, positions - room)

    def _encode(self, texts: Sequence[str], room: int) -> list[list[int]]:
        limit = self._limit(room)
        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        if any(len(ids) == 0 for ids in encoded):
            raise UserInputError("a prompt is empty after tokenization; every prompt needs at least one token")
        return [ids[-limit:] for ids in encoded]

    def _batches(self, encoded: list[list[int]], desc: str):
        """Batches of indices, longest first (less padding, and the slowest batch shows up first)."""
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return tqdm(chunks, desc=desc, disable=not self.progress, leave=False)

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
        device = _device(self.model)
        return ids.to(device), mask.to(device)  # (B, T) each

    # ----- what tasks call ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = (),
                 desc: str = "generate") -> list[str]:
        """Greedy continuation of each prompt (at most ``max_new_tokens``), cut at the first of ``stop``."""
        encoded = self._encode(prompts, room=max_new_tokens)
        outputs: list[str] = [""] * len(prompts)
        eos = self.tokenizer.eos_token_id
        for chunk in self._batches(encoded, desc):
            ids, mask = self._left_padded([encoded[i] for i in chunk])
            with self._autocast():
                out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos)
            new = out[:, ids.shape[1]:]  # (B, new)
            for i, row in zip(chunk, new.tolist()):
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                outputs[i] = _cut(text, stop)
        return outputs

    @torch.no_grad()
    def choice_logprobs(self, prompts: Sequence[str], choices: Sequence[str], desc: str = "score") -> torch.Tensor:
        """``(len(prompts), len(choices))``: the log-likelihood of each choice's tokens right after each prompt
        (prompt and choice tokenized apart, as lm-evaluation-harness does). When every choice is one token (" A"
        for BPE vocabularies) one forward pass per batch scores them all."""
        encoded = self._encode(prompts, room=8)
        options = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        if any(len(o) == 0 for o in options):
            raise UserInputError(f"a choice among {list(choices)} has no tokens")
        scores = torch.empty(len(prompts), len(options))
        single = all(len(o) == 1 for o in options)
        for chunk in self._batches(encoded, desc):
            if single:
                logp = self._last_logprobs([encoded[i] for i in chunk])  # (B, V)
                scores[chunk] = logp[:, [o[0] for o in options]]
                continue
            for j, option in enumerate(options):  # one pass per choice, each scoring all of its tokens
                logp = self._continuation_logprobs([encoded[i] for i in chunk], option)  # (B,)
                scores[chunk, j] = logp
        return scores

    def _forward_logprobs(self, rows: list[list[int]], keep: int) -> tuple[torch.Tensor, int]:
        """Log-probabilities at the last ``keep`` positions of the left-padded rows: ``(B, keep, V)``; the output
        head runs on those positions only when the model takes ``logits_to_keep`` (a 49152-word head over every
        position of a 5-shot prompt costs more than the model body)."""
        ids, mask = self._left_padded(rows)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): models with absolute positions need them
        extra = {"logits_to_keep": keep} if _takes_logits_to_keep(type(self.model)) else {}
        with self._autocast():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                **extra).logits[:, -keep:]
        return torch.log_softmax(logits.float(), dim=-1).cpu(), ids.shape[1]

    def _last_logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        logp, _ = self._forward_logprobs(rows, keep=1)
        return logp[:, -1]  # (B, V): the distribution after each prompt

    def _continuation_logprobs(self, rows: list[list[int]], option: list[int]) -> torch.Tensor:
        k = len(option)
        logp, _ = self._forward_logprobs([r + option for r in rows], keep=k + 1)  # (B, k + 1, V)
        predicted = logp[:, :k]  # (B, k, V): the positions that predict the option's tokens
        return predicted.gather(-1, torch.tensor(option).expand(len(rows), k).unsqueeze(-1)).squeeze(-1).sum(-1)


@functools.lru_cache(maxsize=None)
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _cut(text: str, stop: Sequence[str]) -> str:
    text = text.lstrip() if stop else text  # an answer that starts on a new line is not an empty answer
    cut = len(text)
    for s in stop:
        at = text.find(s)
        if at >= 0:
            cut = min(cut, at)
    return text[:cut]
