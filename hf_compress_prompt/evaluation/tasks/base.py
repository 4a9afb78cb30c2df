"""What a task is, what it returns, and the registry that names the tasks."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ...errors import UserInputError
from .lm import TaskModel

__all__ = ["Task", "TaskResult", "register_task", "get_task", "list_tasks"]


@dataclass
class TaskResult:
    """One task's scores for one model.

    ``metrics`` are in [0, 1] (accuracies, hit rates, ROUGE F1); ``primary`` names the one the "holds" rule uses.
    ``groups`` holds per-group metrics (MMLU subjects, story sizes); ``examples`` the first few model outputs, so
    a person can read what was scored.
    """

    task: str
    metrics: dict[str, float]
    primary: str
    samples: int
    seconds: float
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # what the run used (data source, shots, token budgets)

    @property
    def score(self) -> float:
        return self.metrics[self.primary]

    def to_dict(self) -> dict:
        return asdict(self)


class Task(abc.ABC):
    """A knowledge-intensive task: loads its data and scores a :class:`TaskModel` on it."""

    name: str = ""
    description: str = ""

    @abc.abstractmethod
    def run(self, lm: TaskModel, limit: int | None = None) -> TaskResult:
        """Scores ``lm`` on the first ``limit`` items (all when `None`), deterministically."""


_TASKS: dict[str, Callable[[], Task]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_task(name: str, description: str) -> Callable:
    """Registers a zero-argument factory (a `Task` subclass or a `functools.partial` of one) under ``name``."""

    def decorate(factory: Callable[[], Task]):
        if name in _TASKS:
            raise ValueError(f"a task named {name!r} is already registered")
        if not callable(factory):
            raise TypeError(f"task {name!r} must be registered with a callable that returns a Task")
        _TASKS[name] = factory
        _DESCRIPTIONS[name] = description
        return factory

    return decorate


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise UserInputError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS))}")
    task = _TASKS[name]()
    if not isinstance(task, Task):
        raise TypeError(f"the factory registered as {name!r} returned {type(task).__name__}, not a Task")
    task.name, task.description = name, _DESCRIPTIONS[name]
    return task


def list_tasks() -> dict[str, str]:
    """Registered task names and their one-line descriptions."""
    return {name: _DESCRIPTIONS[name] for name in sorted(_TASKS)}
