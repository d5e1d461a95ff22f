"""The task registry: how a task frames its prompt, reads a model's answer and scores predictions.

Import-light on purpose (the config validator reads :data:`TASKS`); metric libraries load on first use.
Adding a task type is one module with a :class:`Task` and one entry here.
"""

from __future__ import annotations

from tuneloop.tasks.base import INVALID, Statistic, Task, TaskSpec
from tuneloop.tasks.classification import CLASSIFICATION, classification_prompt, parse_label
from tuneloop.tasks.generation import GENERATION
from tuneloop.tasks.json_output import JSON_TASK

TASKS: dict[str, Task] = {task.name: task for task in (CLASSIFICATION, JSON_TASK, GENERATION)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None


__all__ = ["INVALID", "TASKS", "Statistic", "Task", "TaskSpec", "classification_prompt", "get_task", "parse_label"]
