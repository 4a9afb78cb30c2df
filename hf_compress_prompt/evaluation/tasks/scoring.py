"""Scoring rules shared by the tasks: answer normalization and alias matching (SQuAD / TriviaQA conventions, as
LLM-KICK scores factoid QA), and ROUGE from Google's ``rouge-score`` package."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence

from ...errors import MissingResourceError

__all__ = ["normalize_answer", "alias_hit", "rouge"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "‘’´`“”")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def alias_hit(output: str, aliases: Iterable[str]) -> bool:
    """A hit when any non-empty normalized gold alias occurs in the normalized output, on word boundaries
    (``"horse"`` hits ``"a horse."``, not ``"seahorses"``)."""
    produced = f" {normalize_answer(output)} "
    for alias in aliases:
        gold = normalize_answer(alias)
        if gold and f" {gold} " in produced:
            return True
    return False


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (with stemming) over the pairs, in [0, 1]. ROUGE-L on summaries is ``rougeLsum``
    (sentences split on new lines), as the CNN/DailyMail literature reports it."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise MissingResourceError("ROUGE needs the rouge-score package: pip install rouge-score") from None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        totals["rouge1"] += scores["rouge1"].fmeasure
        totals["rouge2"] += scores["rouge2"].fmeasure
        totals["rougeL"] += scores["rougeLsum"].fmeasure
    n = max(1, len(predictions))
    return {k: v / n for k, v in totals.items()}
