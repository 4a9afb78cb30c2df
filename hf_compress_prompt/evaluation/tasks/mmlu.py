"""MMLU by the log-likelihood of the answer letter, 0-shot and 5-shot (dev questions as the shots)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from . import data
from .base import Task, TaskResult, register_task
from .lm import TaskModel

__all__ = ["MMLU", "mmlu_prompt"]


def _format(question: dict, with_answer: bool) -> str:
    text = question["question"].strip() + "".join(
        f"\n{letter}. {choice}" for letter, choice in zip(data.MMLU_CHOICES, question["choices"]))
    return text + "\nAnswer:" + (f" {question['answer']}\n\n" if with_answer else "")


def mmlu_prompt(subject: str, question: dict, shots: list[dict]) -> str:
    """The MMLU prompt of Hendrycks et al. (and LLM-KICK): a header naming the subject, ``shots`` solved dev
    questions, then the question ending in ``Answer:``."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(_format(s, True) for s in shots) + _format(question, False)


@dataclass
class MMLU(Task):
    """Accuracy per subject and averaged over questions and over subjects. The prediction is the letter among
    `` A``/`` B``/`` C``/`` D`` with the highest log-likelihood after ``Answer:`` (LLM-KICK took the one greedy
    token, which can be none of the four; the log-likelihood pick always answers).

    ``limit`` caps the questions per subject (the first ones), so every subject stays in the average.
    """

    shots: int = 0
    subjects: list[str] | None = None

    def run(self, lm: TaskModel, limit: int | None = None) -> TaskResult:
        tests = data.mmlu("test", self.subjects)
        dev = data.mmlu("dev", list(tests)) if self.shots else {}
        start = time.perf_counter()
        prompts, gold, owners = [], [], []
        for subject, questions in tests.items():
            for q in questions[:limit]:
                prompts.append(mmlu_prompt(subject, q, dev.get(subject, [])[:self.shots]))
                gold.append(data.MMLU_CHOICES.index(q["answer"]))
                owners.append(subject)
        scores = lm.choice_logprobs(prompts, [f" {c}" for c in data.MMLU_CHOICES], desc=self.name)  # (N, 4)
        correct = (scores.argmax(-1) == torch.tensor(gold)).tolist()
        groups: dict[str, list[bool]] = {}
        for subject, ok in zip(owners, correct):
            groups.setdefault(subject, []).append(ok)
        per_subject = {s: {"accuracy": sum(v) / len(v), "questions": len(v)} for s, v in groups.items()}
        metrics = {"accuracy": sum(correct) / max(1, len(correct)),
                   "subject_mean_accuracy": sum(g["accuracy"] for g in per_subject.values()) / max(1, len(per_subject))}
        examples = [{"subject": owners[i], "gold": data.MMLU_CHOICES[gold[i]],
                     "predicted": data.MMLU_CHOICES[int(scores[i].argmax())]} for i in range(min(5, len(gold)))]
        return TaskResult(self.name, metrics, "accuracy", len(prompts), time.perf_counter() - start,
                          groups=per_subject, examples=examples)


register_task("mmlu_0shot", "MMLU, 0-shot, log-likelihood of A/B/C/D; accuracy per subject and average")(
    functools.partial(MMLU, shots=0))
register_task("mmlu_5shot", "MMLU, 5-shot (dev questions), log-likelihood of A/B/C/D")(
    functools.partial(MMLU, shots=5))
