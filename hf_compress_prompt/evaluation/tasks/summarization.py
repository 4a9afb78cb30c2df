"""In-context summarization (LLM-KICK): summarize each of the 90 selected CNN/DailyMail stories; ROUGE-1/2/L
against the story's highlights, and an optional judge callable (e.g. an LLM-as-judge where one is reachable)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from . import data
from .base import Task, TaskResult, register_task
from .lm import TaskModel
from .scoring import rouge

__all__ = ["Summarization", "SUMMARY_PROMPT"]

# LLM-KICK's instruction (in-context_summarization/generate_question.py; "news" for the mid and large stories).
SUMMARY_PROMPT = ("Summarize the given {kind} in less than 150 words while preserving high coherence, consistency, "
                  "fluency, and relevance.\n\n{article}")


@register_task("summarization", "LLM-KICK's 90 CNN/DailyMail stories (small/mid/large); ROUGE-1/2/L vs highlights")
@dataclass
class Summarization(Task):
    """Greedy summaries (LLM-KICK sampled at temperature 0.7 and had GPT-4 judge them against GPT-3.5's
    summaries; here decoding is deterministic and the score is ROUGE against the human highlights, with
    ``judge(article, summary) -> float in [0, 1]`` as an optional extra metric). The instruction goes through the
    tokenizer's chat template when it has one and ``TaskModel.chat_template`` (LLM-KICK wrapped it in Vicuna's).
    ``limit`` caps stories per size.
    """

    sizes: tuple[str, ...] = ("small", "mid", "large")
    max_new_tokens: int = 192
    judge: Callable[[str, str], float] | None = None

    def _prompt(self, lm: TaskModel, size: str, article: str) -> str:
        text = SUMMARY_PROMPT.format(kind="story" if size == "small" else "news", article=article)
        templated = lm.instruction(text)
        return templated if templated != text else text + "\n\nSummary:"

    def run(self, lm: TaskModel, limit: int | None = None) -> TaskResult:
        stories = [(size, s) for size in self.sizes for s in data.cnn_dailymail_stories(size)[:limit]]
        start = time.perf_counter()
        prompts = [self._prompt(lm, size, s["article"]) for size, s in stories]
        summaries = [o.strip() for o in lm.generate(prompts, self.max_new_tokens, desc=self.name)]
        references = [s["reference"] for _, s in stories]
        metrics = rouge(summaries, references)
        groups = {}
        for size in self.sizes:
            idx = [i for i, (z, _) in enumerate(stories) if z == size]
            if idx:
                groups[size] = {**rouge([summaries[i] for i in idx], [references[i] for i in idx]), "stories": len(idx)}
        if self.judge is not None:
            metrics["judge"] = sum(float(self.judge(s["article"], out)) for (_, s), out in zip(stories, summaries)) / max(1, len(stories))
        examples = [{"id": s["id"], "size": z, "summary": out, "reference": s["reference"]}
                    for (z, s), out in list(zip(stories, summaries))[:3]]
        return TaskResult(self.name, metrics, "rougeL", len(stories), time.perf_counter() - start, groups=groups,
                          examples=examples, settings={"max_new_tokens": self.max_new_tokens,
                                                       "chat_template": lm.instruction("x") != "x",
                                                       "sizes": list(self.sizes)})
