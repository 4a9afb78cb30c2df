"""The task data: local copies under the data root (``../shared/data``, layout in its SOURCES.md) first, the Hub
otherwise. Every reader checks each record and names the file and line of a malformed one."""

from __future__ import annotations

import csv
from pathlib import Path

from ...data.corpora import _hub_unreachable_reason, data_root
from ...data.jsonl import read_jsonl
from ...errors import MissingResourceError, UserInputError

__all__ = ["read_jsonl", "triviaqa", "mmlu", "mmlu_subjects", "cnn_dailymail_stories", "retrieval_qa"]

MMLU_CHOICES = ("A", "B", "C", "D")


def _local(relative: str) -> Path | None:
    root = data_root()
    path = root / relative if root is not None else None
    return path if path is not None and path.exists() else None


def _hub(path: str, *args, **kwargs):
    """``datasets.load_dataset`` with a one-line error when the Hub cannot be reached (probed once per process, so
    an offline machine does not sit through ``datasets``' retries)."""
    reason = _hub_unreachable_reason()
    if reason:
        raise MissingResourceError(f"dataset {path!r} is not in the local data root ({data_root()}) and could not be "
                                   f"read from the Hub ({reason}); set $HF_COMPRESS_PROMPT_DATA to a folder that holds it")
    try:
        from datasets import load_dataset

        return load_dataset(path, *args, **kwargs)
    except Exception as error:  # noqa: BLE001 - offline, missing package or dataset: one message for all
        raise MissingResourceError(
            f"dataset {path!r} is not in the local data root ({data_root()}) and could not be read from the Hub "
            f"({type(error).__name__}); set $HF_COMPRESS_PROMPT_DATA to a folder that holds it") from None


# ----- factoid QA ---------------------------------------------------------------------------------------------------
def triviaqa(path: str | Path | None = None) -> list[dict]:
    """TriviaQA questions with their gold aliases: ``{"question", "answer", "aliases"}``.

    Local: ``triviaqa/triviaqa_sm_sub.jsonl`` (3000 questions, llm-foundry's sample, ``{"context": "Question: ...
    \\nAnswer:", "answer", "aliases"}``). Hub: ``mandarjoshi90/trivia_qa`` ``rc.nocontext`` validation.
    """
    path = Path(path) if path is not None else _local("triviaqa/triviaqa_sm_sub.jsonl")
    if path is not None:
        rows = []
        for r in read_jsonl(path, ("context", "answer", "aliases")):
            question = r["context"].removeprefix("Question:").strip()
            question = question.removesuffix("Answer:").strip()
            rows.append({"question": question, "answer": r["answer"], "aliases": list(r["aliases"]) or [r["answer"]]})
        return rows
    data = _hub("mandarjoshi90/trivia_qa", "rc.nocontext", split="validation")
    return [{"question": r["question"], "answer": r["answer"]["value"],
             "aliases": sorted({r["answer"]["value"], *r["answer"]["aliases"]})} for r in data]


# ----- MMLU ---------------------------------------------------------------------------------------------------------
def _mmlu_dir() -> Path | None:
    return _local("mmlu")


def mmlu_subjects() -> list[str]:
    folder = _mmlu_dir()
    if folder is not None:
        return sorted(p.name.removesuffix("_test.csv") for p in (folder / "test").glob("*_test.csv"))
    return sorted(set(_hub("cais/mmlu", "all", split="test")["subject"]))


def mmlu(split: str, subjects: list[str] | None = None) -> dict[str, list[dict]]:
    """Questions per subject: ``{"question", "choices": [4 strings], "answer": "A".."D"}``.

    Local: ``mmlu/{dev,val,test}/<subject>_<split>.csv`` (hendrycks/test layout: no header; question, A, B, C, D,
    answer). Hub: ``cais/mmlu`` (``dev``, ``validation``, ``test``).
    """
    if split not in ("dev", "val", "test"):
        raise UserInputError(f"MMLU split {split!r} is not one of dev, val, test")
    folder = _mmlu_dir()
    out: dict[str, list[dict]] = {}
    if folder is not None:
        for subject in subjects or mmlu_subjects():
            path = folder / split / f"{subject}_{split}.csv"
            if not path.is_file():
                raise UserInputError(f"MMLU subject {subject!r} has no file {path}; see mmlu_subjects()")
            rows = []
            with path.open(encoding="utf-8", newline="") as f:
                for line_no, row in enumerate(csv.reader(f), 1):
                    if len(row) != 6 or row[5].strip() not in MMLU_CHOICES:
                        raise UserInputError(f"{path}:{line_no} must have 6 columns (question, A, B, C, D, answer "
                                             f"in A-D); it has {len(row)}")
                    rows.append({"question": row[0], "choices": row[1:5], "answer": row[5].strip()})
            out[subject] = rows
        return out
    hub_split = {"dev": "dev", "val": "validation", "test": "test"}[split]
    data = _hub("cais/mmlu", "all", split=hub_split)
    for r in data:
        if subjects is None or r["subject"] in subjects:
            out.setdefault(r["subject"], []).append(
                {"question": r["question"], "choices": list(r["choices"]), "answer": MMLU_CHOICES[r["answer"]]})
    return dict(sorted(out.items()))


# ----- summarization ------------------------------------------------------------------------------------------------
def _story(path: Path) -> dict:
    """A CNN/DailyMail ``.story`` file: the article, then ``@highlight`` paragraphs (the reference summary)."""
    text = path.read_text(encoding="utf-8")
    parts = text.split("@highlight")
    article = " ".join(p.strip() for p in parts[0].split("\n\n") if p.strip())
    highlights = [p.strip() for p in parts[1:] if p.strip()]
    if not article or not highlights:
        raise UserInputError(f"{path} must hold an article followed by @highlight lines")
    return {"id": path.stem, "article": article, "reference": "\n".join(highlights)}


def cnn_dailymail_stories(size: str) -> list[dict]:
    """LLM-KICK's in-context summarization stories of one size (``small``, ``mid`` or ``large``; 30 each):
    ``{"id", "article", "reference"}`` with the highlights joined as the reference summary."""
    if size not in ("small", "mid", "large"):
        raise UserInputError(f"story size {size!r} is not one of small, mid, large")
    folder = _local(f"cnn_dailymail/llm-kick-selected/{size}")
    if folder is None:
        raise MissingResourceError(
            f"LLM-KICK's selected CNN/DailyMail stories are not under {data_root()}/cnn_dailymail/llm-kick-selected; "
            "they come from the VITA-Group/llm-kick repository (no Hub dataset holds this selection)")
    stories = [_story(p) for p in sorted(folder.glob("*.story"))]
    if not stories:
        raise UserInputError(f"{folder} holds no .story files")
    return stories


# ----- in-context retrieval QA --------------------------------------------------------------------------------------
def retrieval_qa(path: str | Path | None = None) -> list[dict]:
    """Questions with an evidence passage and gold answers: ``{"question", "context", "answers": [...]}``.

    From ``path`` (JSON lines with those keys) or ``squad/dev.jsonl`` under the data root when present; otherwise
    SQuAD v1.1 validation from the Hub (``rajpurkar/squad``).
    """
    path = Path(path) if path is not None else _local("squad/dev.jsonl")
    if path is not None:
        rows = read_jsonl(path, ("question", "context", "answers"))
        for line_no, r in enumerate(rows, 1):
            if not isinstance(r["answers"], list) or not r["answers"]:
                raise UserInputError(f"{path}: record {line_no} needs a non-empty list of answers")
        return rows
    data = _hub("rajpurkar/squad", split="validation")
    return [{"question": r["question"], "context": r["context"], "answers": sorted(set(r["answers"]["text"]))}
            for r in data]
