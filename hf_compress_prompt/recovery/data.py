"""Training data for a recovery prompt: fixed-length windows of generic text (the paper trains on C4), split by
document into training and validation parts, and a public data collator for ``transformers.Trainer``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..data.corpora import DataSource, load_rows, training_corpus
from ..errors import UserInputError

__all__ = ["PromptTuningCollator", "TokenWindows", "token_windows"]


def token_windows(
    name: str,
    tokenizer,
    seqlen: int = 512,
    *,
    part: str = "train",
    valid_fraction: float = 0.1,
    split: str = "train",
    max_windows: int | None = None,
    source: DataSource | str = DataSource.AUTO,
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from a corpus split, documents joined with the EOS token.

    The split's documents (rows) are divided once, deterministically: the last ``valid_fraction`` of them form the
    ``"valid"`` part, the rest ``"train"``, so validation text is never trained on. Where the corpus is unreachable
    and has an offline fallback (C4), its windows come from that instead, said in one line
    (:func:`~hf_compress_prompt.data.training_corpus`).

    Returns:
        `torch.LongTensor` of shape `(windows, seqlen)`.
    """
    if part not in ("train", "valid"):
        raise UserInputError(f"part={part!r}; use 'train' or 'valid'")
    if seqlen < 2 or not 0 < valid_fraction < 1:
        raise UserInputError(f"seqlen={seqlen}, valid_fraction={valid_fraction}: need seqlen >= 2 and 0 < fraction < 1")
    name, split = training_corpus(name, split, source=source, data_dir=data_dir)  # C4 offline: the shipped sample
    rows = [r for r in load_rows(name, split, source=source, data_dir=data_dir) if r and r.strip()]
    if len(rows) < 2:
        raise UserInputError(f"dataset {name!r} split {split!r} has {len(rows)} non-empty rows; need at least 2")
    cut = len(rows) - max(1, round(len(rows) * valid_fraction))
    chosen = rows[:cut] if part == "train" else rows[cut:]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(chosen, verbose=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    count = len(stream) // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise UserInputError(
            f"the {part} part of {name!r} has {len(stream)} tokens, fewer than one window of {seqlen}; "
            "use a shorter seqlen or a larger corpus"
        )
    return torch.tensor(stream[: count * seqlen], dtype=torch.long).view(count, seqlen)  # (windows, seqlen)


class TokenWindows(Dataset):
    """A dataset of token windows (rows of a `(windows, seqlen)` tensor) as ``{"input_ids": ...}`` examples."""

    def __init__(self, windows: torch.Tensor):
        if windows.dim() != 2 or windows.shape[0] == 0:
            raise UserInputError(f"need a non-empty (windows, seqlen) tensor of token ids, got {tuple(windows.shape)}")
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i]}


@dataclass
class PromptTuningCollator:
    """Batches causal-LM examples for prompt tuning: ``input_ids`` right-padded to the longest, ``attention_mask``,
    and ``labels`` = the inputs with padding and the first token set to -100 (the prompt's positions are added by
    the PEFT model).

    Why the first label is masked: PEFT prepends -100 labels for the virtual tokens, so the last virtual token would
    score the first real token, one prediction more than ``Trainer`` counts for ``num_items_in_batch`` (it sees
    only the real labels), which inflates every loss by ``L / (L - 1)``. Masked, the loss scores the same ``L - 1``
    next tokens as the model without a prompt does, and the attached runtime prompt
    (:mod:`hf_compress_prompt.recovery.runtime`) does.

    A text prompt (``prefix_ids``, e.g. Compresso's collaborative prompt) goes in front of every example, attended
    and never scored; the first token after it is masked as above, so the loss scores what it would without it.

    Examples are dicts with ``input_ids`` (list or 1-D tensor) and optionally ``attention_mask`` and ``labels``.
    """

    pad_token_id: int = 0
    prefix_ids: tuple[int, ...] = ()

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise UserInputError("cannot collate an empty batch")
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        p = len(self.prefix_ids)
        width = p + max(t.numel() for t in ids)
        batch = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)  # (B, P + L)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        labels = torch.full((len(ids), width), -100, dtype=torch.long)
        batch[:, :p] = torch.tensor(self.prefix_ids, dtype=torch.long)
        mask[:, :p] = 1
        for i, (t, f) in enumerate(zip(ids, features)):
            n = t.numel()
            batch[i, p:p + n] = t
            mask[i, p:p + n] = torch.as_tensor(f["attention_mask"]) if "attention_mask" in f else 1
            labels[i, p:p + n] = torch.as_tensor(f["labels"]) if "labels" in f else t
        labels[mask == 0] = -100
        labels[:, p] = -100  # the first token of the text (the prefix's labels are -100 already)
        return {"input_ids": batch, "attention_mask": mask, "labels": labels}
