"""Task types, looked up by name (``task:`` in the config): prompt framing, answer parsing, scoring.

Import-light on purpose: config validation reads :data:`TASKS`, and metric libraries load on first use.
"""

from tuneloop.tasks.registry import (
    INVALID,
    TASKS,
    Statistic,
    Task,
    TaskSpec,
    classification_prompt,
    get_task,
    parse_label,
)

__all__ = ["INVALID", "TASKS", "Statistic", "Task", "TaskSpec", "classification_prompt", "get_task", "parse_label"]
