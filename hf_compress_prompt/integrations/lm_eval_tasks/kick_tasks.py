"""Data and scoring for the LLM-KICK task configs beside this file (lm-evaluation-harness loads it through the
``!function`` tags). Prompts and rules are the ones :mod:`hf_compress_prompt.evaluation.tasks` uses, so both
harnesses score the same thing."""

from __future__ import annotations

from datasets import Dataset, DatasetDict

from hf_compress_prompt.evaluation.tasks import data
from hf_compress_prompt.evaluation.tasks.factoid_qa import FACTOID_PROMPT
from hf_compress_prompt.evaluation.tasks.mmlu import mmlu_prompt
from hf_compress_prompt.evaluation.tasks.retrieval_qa import (
    CLOSED_BOOK_PROMPT,
    OPEN_BOOK_PROMPT,
    RetrievalQA,
    token_f1,
)
from hf_compress_prompt.evaluation.tasks.scoring import alias_hit, rouge
from hf_compress_prompt.evaluation.tasks.summarization import SUMMARY_PROMPT


def _test(rows: list[dict]) -> DatasetDict:
    return DatasetDict({"test": Dataset.from_list(rows)})


def factoid_qa(**_) -> DatasetDict:
    return _test([{"prompt": FACTOID_PROMPT.format(question=r["question"]), "aliases": r["aliases"]}
                  for r in data.triviaqa()])


def factoid_results(doc: dict, results: list[str]) -> dict:
    return {"accuracy": float(alias_hit(results[0].split("\n")[0], doc["aliases"]))}


def _mmlu(shots: int) -> DatasetDict:
    tests = data.mmlu("test")
    dev = data.mmlu("dev", list(tests)) if shots else {}
    return _test([{"prompt": mmlu_prompt(s, q, dev.get(s, [])[:shots]), "subject": s,
                   "label": data.MMLU_CHOICES.index(q["answer"])} for s, qs in tests.items() for q in qs])


def mmlu_0shot(**_) -> DatasetDict:
    return _mmlu(0)


def mmlu_5shot(**_) -> DatasetDict:
    return _mmlu(5)


def _retrieval(template: str) -> DatasetDict:
    task = RetrievalQA()
    rows, _ = task.rows()
    return _test([{"prompt": template.format(question=r["question"], context=r["context"][:task.context_chars]),
                   "answers": r["answers"]} for r in rows])


def retrieval_qa_closed(**_) -> DatasetDict:
    return _retrieval(CLOSED_BOOK_PROMPT)


def retrieval_qa_open(**_) -> DatasetDict:
    return _retrieval(OPEN_BOOK_PROMPT)


def retrieval_results(doc: dict, results: list[str]) -> dict:
    answer = results[0].split("\n")[0]
    return {"hit": float(alias_hit(answer, doc["answers"])), "f1": max(token_f1(answer, a) for a in doc["answers"])}


def summarization(**_) -> DatasetDict:
    rows = []
    for size in ("small", "mid", "large"):
        for s in data.cnn_dailymail_stories(size):
            text = SUMMARY_PROMPT.format(kind="story" if size == "small" else "news", article=s["article"])
            rows.append({"prompt": text + "\n\nSummary:", "reference": s["reference"], "size": size})
    return _test(rows)


def summarization_results(doc: dict, results: list[str]) -> dict:
    return rouge([results[0].strip()], [doc["reference"]])
