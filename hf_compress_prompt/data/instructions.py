"""Instruction data as training windows: an Alpaca-style JSON-lines file (``instruction``, optional ``input``,
``output``) in the Alpaca template, one sample per window."""

from __future__ import annotations

import os

import torch

from .jsonl import read_jsonl

__all__ = ["instruction_windows"]


def _alpaca_text(row: dict) -> str:
    """One sample in the Alpaca template: instruction, input (when given) and response."""
    text = f"### Instruction:\n{row['instruction']}\n\n"
    if row.get("input"):
        text += f"### Input:\n{row['input']}\n\n"
    return text + f"### Response:\n{row['output']}"


def instruction_windows(path: str | os.PathLike, tokenizer, seqlen: int) -> torch.Tensor:
    """Token windows from an Alpaca-style JSONL file (``instruction``, optional ``input``, ``output``), one sample
    per window (truncated to ``seqlen``, right-padded with EOS). A missing file, a malformed line or an empty file
    fails naming the file (and line).

    Returns:
        `torch.LongTensor` of shape `(samples, seqlen)`.
    """
    rows = read_jsonl(path, ("instruction", "output"))
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    windows = []
    for row in rows:
        ids = tokenizer(_alpaca_text(row), add_special_tokens=False)["input_ids"][:seqlen]
        windows.append(ids + [pad] * (seqlen - len(ids)))
    return torch.tensor(windows, dtype=torch.long)  # (samples, seqlen)
