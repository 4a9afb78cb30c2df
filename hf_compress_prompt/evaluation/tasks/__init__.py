"""Knowledge-intensive evaluation (LLM-KICK): factoid QA, MMLU, in-context retrieval QA and summarization, run
on several models side by side. Importing this package registers the tasks."""

from . import factoid_qa, mmlu, retrieval_qa, summarization  # noqa: F401  (registration)
from .base import Task, TaskResult, get_task, list_tasks, register_task
from .lm import TaskModel
from .runner import TaskReport, evaluate_tasks, holds

__all__ = ["Task", "TaskModel", "TaskReport", "TaskResult", "evaluate_tasks", "get_task", "holds", "list_tasks",
           "register_task"]
