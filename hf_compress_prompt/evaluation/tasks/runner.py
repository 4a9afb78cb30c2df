"""One run, several models: every task on every model (dense, compressed, recovered), side by side, with
LLM-KICK's rule that a compressed model "holds" a task when it stays within epsilon_0 = 5% of the dense model."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import UserInputError
from .base import TaskResult, get_task
from .lm import TaskModel

__all__ = ["TaskReport", "evaluate_tasks", "holds"]


def holds(score: float, reference: float, epsilon: float = 0.05) -> bool:
    """LLM-KICK's rule: within ``epsilon`` of the reference, read as a relative drop (``score >= (1 - epsilon) *
    reference``; the paper says "within 5%" without saying relative or absolute, and its code has no rule)."""
    return score >= (1.0 - epsilon) * reference


@dataclass
class TaskReport:
    """``results[model][task]`` for every model and task of one run, and the settings it used."""

    results: dict[str, dict[str, TaskResult]]
    reference: str | None
    epsilon: float
    settings: dict = field(default_factory=dict)

    def scores(self) -> dict[str, dict[str, float]]:
        return {m: {t: r.score for t, r in tasks.items()} for m, tasks in self.results.items()}

    def holds(self) -> dict[str, dict[str, bool]]:
        """For each model other than the reference, whether it holds each task."""
        if self.reference is None:
            return {}
        ref = self.results[self.reference]
        return {m: {t: holds(r.score, ref[t].score, self.epsilon) for t, r in tasks.items()}
                for m, tasks in self.results.items() if m != self.reference}

    def to_dict(self) -> dict:
        return {"reference": self.reference, "epsilon": self.epsilon, "settings": self.settings,
                "holds": self.holds(),
                "results": {m: {t: r.to_dict() for t, r in tasks.items()} for m, tasks in self.results.items()}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> TaskReport:
        try:
            raw = json.loads(Path(path).read_text())
            results = {m: {t: TaskResult(**r) for t, r in tasks.items()} for m, tasks in raw["results"].items()}
            return cls(results, raw["reference"], raw["epsilon"], raw.get("settings", {}))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserInputError(f"{path} is not a task report written by evaluate_tasks ({error})") from None

    def to_markdown(self) -> str:
        models = list(self.results)
        tasks = list(dict.fromkeys(t for r in self.results.values() for t in r))
        lines = ["| task (metric) | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        held = self.holds()
        for t in tasks:
            first = next(r[t] for r in self.results.values() if t in r)
            cells = []
            for m in models:
                r = self.results[m].get(t)
                cell = "-" if r is None else f"{100 * r.score:.1f}"
                if r is not None and m in held and t in held[m]:
                    cell += " (holds)" if held[m][t] else " (drops)"
                cells.append(cell)
            lines.append(f"| {t} ({first.primary}, n={first.samples}) | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def evaluate_tasks(
    models: Mapping[str, torch.nn.Module],
    tokenizer,
    tasks: Sequence[str] = ("factoid_qa", "mmlu_0shot", "mmlu_5shot", "retrieval_qa", "summarization"),
    *,
    limit: int | None = None,
    reference: str | None = "dense",
    epsilon: float = 0.05,
    batch_size: int = 8,
    autocast_bf16: bool | None = None,
    progress: bool = True,
    seed: int = 0,
    chat_template: bool = True,
    task_options: Mapping[str, dict] | None = None,
) -> TaskReport:
    """Runs every task on every model and returns the side-by-side report.

    Args:
        models (`Mapping[str, PreTrainedModel]`): name -> model, e.g. ``{"dense": d, "sparse+4bit": c,
            "sparse+4bit+prompt": r}``; a recovery prompt attached to a model applies itself.
        tokenizer: the tokenizer all the models share.
        tasks: registered task names (:func:`list_tasks`).
        limit (`int`, *optional*): first items per task (per subject for MMLU, per size for summarization).
        reference (`str`, *optional*, defaults to ``"dense"``): the model the others are held against (`None`:
            no rule); it must be one of ``models``.
        epsilon (`float`, defaults to 0.05): LLM-KICK's epsilon_0, a relative drop.
        autocast_bf16 (`bool`, *optional*): bf16 autocast; `None`: where bf16 matmuls are fast on each model's device.
        chat_template (`bool`, defaults to `True`): generation tasks use the tokenizer's chat template if it has one.
        task_options: task name -> attributes to set on it (``{"summarization": {"max_new_tokens": 64}}``).
    """
    if not models:
        raise UserInputError("evaluate_tasks needs at least one model")
    if reference is not None and reference not in models:
        raise UserInputError(f"reference model {reference!r} is not among the models {list(models)}; pass one of "
                             "them or reference=None")
    if not 0 <= epsilon < 1:
        raise UserInputError(f"epsilon={epsilon} must be in [0, 1)")
    if limit is not None and limit < 1:
        raise UserInputError(f"limit={limit} must be at least 1")
    built = [get_task(name) for name in tasks]  # unknown names fail before any model runs
    for task in built:
        for key, value in (task_options or {}).get(task.name, {}).items():
            if not hasattr(task, key):
                raise UserInputError(f"task {task.name!r} has no option {key!r}")
            setattr(task, key, value)
    results: dict[str, dict[str, TaskResult]] = {}
    start = time.perf_counter()
    for name, model in models.items():
        lm = TaskModel(model, tokenizer, batch_size=batch_size, autocast_bf16=autocast_bf16, progress=progress,
                       chat_template=chat_template)
        was_training = model.training
        model.eval()
        try:
            results[name] = {}
            for task in built:
                random.seed(seed)
                torch.manual_seed(seed)
                results[name][task.name] = task.run(lm, limit)
        finally:
            model.train(was_training)
    settings = {"tasks": list(tasks), "limit": limit, "batch_size": batch_size, "autocast_bf16": lm.autocast_bf16,
                "seed": seed, "chat_template": chat_template, "seconds": time.perf_counter() - start, "task_options": dict(task_options or {})}
    return TaskReport(results, reference, epsilon, settings)
