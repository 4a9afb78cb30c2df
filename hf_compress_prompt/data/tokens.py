"""Token streams for perplexity and calibration batches for compression and prompt training."""

from __future__ import annotations

import os
import random

import torch

from .._logging import get_logger
from ..errors import UserInputError
from .corpora import DataSource, get_corpus, load_rows, load_text, training_corpus

__all__ = ["eval_tokens", "calibration_batches"]

logger = get_logger(__name__)


def _encode(tokenizer, text: str) -> torch.Tensor:
    # One call over the whole text, as GPTQ does; the tokenizer's model_max_length does not apply here.
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def eval_tokens(
    name: str,
    tokenizer,
    split: str = "test",
    *,
    source: DataSource | str = DataSource.AUTO,
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """The evaluation split of a corpus, joined as GPTQ does and tokenized once.

    Returns:
        `torch.LongTensor` of shape `(1, num_tokens)`.
    """
    text = load_text(name, split, source=source, data_dir=data_dir)
    ids = _encode(tokenizer, text)
    logger.info("%s/%s: %d characters -> %d tokens", name, split, len(text), ids.numel())
    return ids.unsqueeze(0)  # (1, N)


def calibration_batches(
    name: str,
    tokenizer,
    nsamples: int = 128,
    seqlen: int = 2048,
    *,
    seed: int = 0,
    split: str = "train",
    source: DataSource | str = DataSource.AUTO,
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from a corpus's training split.

    Document corpora (C4, the Wikipedia sample) follow GPTQ: pick a random document at least ``seqlen`` tokens long,
    then a random window inside it. When no document is long enough, or the corpus is one running text
    (WikiText-2, PTB), windows are cut from the rows joined into one stream. Deterministic for a given ``seed``
    (a private RNG; the global one is untouched). Where the corpus is unreachable and has an offline fallback (C4),
    the windows come from that instead, said in one line (:func:`~.corpora.training_corpus`).

    Returns:
        `torch.LongTensor` of shape `(nsamples, seqlen)`.
    """
    if nsamples < 1 or seqlen < 2:
        raise UserInputError(f"nsamples={nsamples}, seqlen={seqlen}: need nsamples >= 1 and seqlen >= 2")
    name, split = training_corpus(name, split, source=source, data_dir=data_dir)  # C4 offline: the shipped sample
    corpus = get_corpus(name)
    rows = load_rows(name, split, source=source, data_dir=data_dir)
    rng = random.Random(seed)
    if corpus.documents:
        encoded = [ids for ids in tokenizer([r for r in rows if r], verbose=False)["input_ids"]]
        long_enough = [ids for ids in encoded if len(ids) >= seqlen]
        if long_enough:
            logger.info("%s/%s: %d of %d documents have >= %d tokens", name, split, len(long_enough), len(encoded), seqlen)
            windows = []
            for _ in range(nsamples):
                ids = long_enough[rng.randrange(len(long_enough))]
                start = rng.randint(0, len(ids) - seqlen)
                windows.append(ids[start : start + seqlen])
            return torch.tensor(windows, dtype=torch.long)  # (nsamples, seqlen)
        logger.info("%s/%s: no document has %d tokens; sampling from the joined stream", name, split, seqlen)
        stream = _encode(tokenizer, corpus.join.join(rows))
    else:
        stream = _encode(tokenizer, corpus.join.join(rows))
    if stream.numel() < seqlen:
        raise UserInputError(
            f"dataset {name!r} split {split!r} has {stream.numel()} tokens, fewer than seqlen={seqlen}; "
            "use a shorter seqlen or a larger corpus"
        )
    starts = [rng.randint(0, stream.numel() - seqlen) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])  # (nsamples, seqlen)
