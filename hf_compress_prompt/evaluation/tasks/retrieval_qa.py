"""In-context retrieval QA (LLM-KICK): the same questions closed-book and open-book (with the evidence passage
before them). The gap between the two shows whether a compressed model can still read an answer from its context
even where its stored knowledge is gone."""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass

from . import data
from .base import Task, TaskResult, register_task
from .lm import TaskModel
from .scoring import alias_hit, normalize_answer

__all__ = ["RetrievalQA", "cnn_cloze_questions", "token_f1", "OPEN_BOOK_PROMPT", "CLOSED_BOOK_PROMPT"]

# LLM-KICK's two prompts (incontext_qa/main_icrqa.py), the evidence joined in front of the open-book one.
OPEN_BOOK_PROMPT = "{context}\n\nBased on these texts, answer these questions:\n\nQ: {question}\nA:"
CLOSED_BOOK_PROMPT = "Answer these questions:\n\nQ: {question}\nA:"

_NAME = re.compile(r"\b[A-Z][\w'\-]*[a-z][\w'\-]*(?:\s+(?:of\s+|de\s+)?[A-Z][\w'\-]*[a-z][\w'\-]*)*")
_NOT_NAMES = {"The", "A", "An", "He", "She", "It", "They", "We", "I", "His", "Her", "Their", "This", "That", "In",
              "On", "At", "But", "And", "Police", "Officials", "Authorities", "Mr", "Mrs", "Ms", "Dr", "New"}


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD's token F1 between normalized strings."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def cnn_cloze_questions(context_chars: int = 3072) -> list[dict]:
    """Cloze questions over LLM-KICK's CNN/DailyMail stories, the reading task the corpus was built for
    (Hermann et al., 2015): in each story's first highlight that has one, the first name (a run of capitalised
    words, not a pronoun or the sentence's opening word alone) that also occurs in the first ``context_chars``
    characters of the article is blanked out. The evidence is those characters (LLM-KICK cut TriviaQA's evidence
    at 3072 characters too). One question per story, in file order; stories in two size buckets count once."""
    rows, seen = [], set()
    for size in ("small", "mid", "large"):
        for story in data.cnn_dailymail_stories(size):
            if story["id"] in seen:
                continue
            seen.add(story["id"])
            context = story["article"][:context_chars]
            for highlight in story["reference"].split("\n"):
                question = _blank(highlight, context)
                if question is not None:
                    rows.append({"id": story["id"], "context": context, **question})
                    break
    return rows


def _blank(highlight: str, context: str) -> dict | None:
    for match in _NAME.finditer(highlight):
        name = match.group(0)
        opening = not highlight[:match.start()].strip(" \"'")
        if name in _NOT_NAMES or (opening and " " not in name) or len(name) < 3 or name not in context:
            continue
        cloze = highlight[:match.start()] + "___" + highlight[match.end():]
        return {"question": f'Which name fills the blank in "{cloze.strip()}"?', "answers": [name]}
    return None


@register_task("retrieval_qa", "questions closed-book and open-book (evidence in the prompt); hit rate and token F1")
@dataclass
class RetrievalQA(Task):
    """Scores each question twice: ``closed_book_*`` without the passage and ``open_book_*`` with it; the primary
    metric is the open-book hit rate (the in-context retrieval skill). Prompts go through the chat template when
    the tokenizer has one (``TaskModel.chat_template``). A hit is a gold answer inside the
    normalized output (LLM-KICK also counted the output inside the gold, which lets an empty answer match).

    Data: ``path`` (JSON lines ``{"question", "context", "answers"}``), else ``squad/dev.jsonl`` under the data root,
    else SQuAD v1.1 validation from the Hub; ``source="cnn_cloze"`` uses the local CNN/DailyMail cloze questions
    (:func:`cnn_cloze_questions`), and ``source="auto"`` (default) falls back to them when neither file nor Hub is
    reachable.
    """

    source: str = "auto"
    path: str | None = None
    max_new_tokens: int = 24
    context_chars: int = 3072

    def rows(self) -> tuple[list[dict], str]:
        """The questions this task would score, and where they came from (``squad``, a path or ``cnn_cloze``)."""
        if self.source not in ("auto", "squad", "cnn_cloze"):
            raise ValueError(f"source={self.source!r} is not one of auto, squad, cnn_cloze")
        if self.source == "cnn_cloze":
            return cnn_cloze_questions(self.context_chars), "cnn_cloze"
        try:
            return data.retrieval_qa(self.path), "squad" if self.path is None else str(self.path)
        except data.MissingResourceError:
            if self.source == "squad" or self.path is not None:
                raise
            return cnn_cloze_questions(self.context_chars), "cnn_cloze"

    def run(self, lm: TaskModel, limit: int | None = None) -> TaskResult:
        rows, source = self.rows()
        rows = rows[:limit]
        start = time.perf_counter()
        metrics, examples = {}, {}
        for book, template in (("closed_book", CLOSED_BOOK_PROMPT), ("open_book", OPEN_BOOK_PROMPT)):
            prompts = [lm.instruction(template.format(question=r["question"], context=r["context"][:self.context_chars]))
                       for r in rows]
            outputs = lm.generate(prompts, self.max_new_tokens, stop=("\n",), desc=f"{self.name} ({book})")
            hits = [alias_hit(o, r["answers"]) for o, r in zip(outputs, rows)]
            f1 = [max(token_f1(o, a) for a in r["answers"]) for o, r in zip(outputs, rows)]
            metrics[f"{book}_hit"] = sum(hits) / max(1, len(rows))
            metrics[f"{book}_f1"] = sum(f1) / max(1, len(rows))
            examples[book] = outputs[:5]
        shown = [{"question": r["question"], "gold": r["answers"][0], "closed_book": c, "open_book": o}
                 for r, c, o in zip(rows, examples["closed_book"], examples["open_book"])]
        return TaskResult(self.name, metrics, "open_book_hit", len(rows), time.perf_counter() - start,
                          examples=shown, settings={"source": source, "max_new_tokens": self.max_new_tokens,
                                                    "context_chars": self.context_chars,
                                                    "chat_template": lm.instruction("x") != "x"})
