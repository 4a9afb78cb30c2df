"""Factoid QA (LLM-KICK): a question, greedy decoding, a hit when a gold alias appears in the answer."""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import data
from .base import Task, TaskResult, register_task
from .lm import TaskModel
from .scoring import alias_hit

__all__ = ["FactoidQA", "FACTOID_PROMPT"]

FACTOID_PROMPT = "Please give answer to this question: {question}\nThe answer is "  # LLM-KICK's, verbatim


@register_task("factoid_qa", "TriviaQA questions, LLM-KICK's prompt, greedy; hit = a normalized gold alias in the answer")
@dataclass
class FactoidQA(Task):
    """LLM-KICK's factoid QA on TriviaQA (its code uses FreebaseQA, which has no copy here).

    Differences from LLM-KICK's script, on purpose: only the generated text is scored (its script decoded the
    prompt too, so an answer inside the question counted), the prompt goes through the chat template when the
    tokenizer has one (``TaskModel.chat_template``; an instruct model otherwise starts a numbered list),
    generation stops at the first new line or after ``max_new_tokens``, and matching keeps word boundaries (its
    script removed every space, so "horse" hit "seahorses").
    """

    max_new_tokens: int = 32
    path: str | None = None  # JSON lines like triviaqa_sm_sub.jsonl; default: the local sample, else the Hub

    def run(self, lm: TaskModel, limit: int | None = None) -> TaskResult:
        rows = data.triviaqa(self.path)[:limit]
        start = time.perf_counter()
        prompts = [lm.instruction(FACTOID_PROMPT.format(question=r["question"])) for r in rows]
        answers = lm.generate(prompts, self.max_new_tokens, stop=("\n",), desc=self.name)
        hits = [alias_hit(a, r["aliases"]) for a, r in zip(answers, rows)]
        examples = [{"question": r["question"], "output": a, "gold": r["answer"], "hit": h}
                    for r, a, h in list(zip(rows, answers, hits))[:5]]
        return TaskResult(self.name, {"accuracy": sum(hits) / max(1, len(hits))}, "accuracy", len(rows),
                          time.perf_counter() - start, examples=examples,
                          settings={"max_new_tokens": self.max_new_tokens, "chat_template": lm.instruction("x") != "x"})
