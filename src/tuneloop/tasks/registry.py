"""The task registry: how a task frames its prompt, reads a model's answer and scores predictions.

Import-light on purpose (the config validator reads :data:`TASKS`); metric libraries load on first use.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneloop.data.types import Conversation

INVALID = "<invalid>"


@dataclass(frozen=True)
class TaskSpec:
    """What a trained run must remember about its task to be used later (predict, serve, eval)."""

    task: str
    system_prompt: str | None
    labels: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "system_prompt": self.system_prompt, "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        return cls(data["task"], data.get("system_prompt"), tuple(data.get("labels") or ()))


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make_spec: Callable[[Sequence[Conversation], tuple[str, ...] | None, str | None], TaskSpec]
    parse_answer: Callable[[str, TaskSpec], str]
    score: Callable[[Sequence[str], Sequence[str], TaskSpec], dict[str, Any]]


# --- classification --------------------------------------------------------------------------------------


def classification_prompt(labels: Sequence[str]) -> str:
    return (
        "Classify the message into exactly one of these categories: "
        + ", ".join(labels)
        + ". Answer with the category name only."
    )


def _classification_spec(
    train: Sequence[Conversation], labels: tuple[str, ...] | None, system_prompt: str | None
) -> TaskSpec:
    found = sorted({c.label for c in train if c.label is not None})
    chosen = tuple(labels) if labels else tuple(found)
    unknown = sorted(set(found) - set(chosen))
    if unknown:
        raise ValueError(f"training data has labels outside the configured label set: {', '.join(unknown)}")
    if len(chosen) < 2:
        raise ValueError(f"classification needs at least two labels, found {list(chosen)}")
    return TaskSpec("classification", system_prompt or classification_prompt(chosen), chosen)


def _normalise(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", re.sub(r"[^\w\s\-]", "", text.lower())).strip()


def parse_label(output: str, spec: TaskSpec) -> str:
    """Map generated text to a label: exact (normalised) match, then a unique label at the start or inside.

    Anything else is :data:`INVALID` and counts as wrong: a router cannot act on "I think it's billing or
    maybe onboarding".
    """
    text = _normalise(output)
    by_norm = {_normalise(label): label for label in spec.labels}
    if text in by_norm:
        return by_norm[text]
    starts = [label for norm, label in by_norm.items() if text.startswith(norm)]
    if len(starts) == 1:
        return starts[0]
    inside = [label for norm, label in by_norm.items() if re.search(rf"\b{re.escape(norm)}\b", text)]
    return inside[0] if len(inside) == 1 else INVALID


def _score_classification(predictions: Sequence[str], references: Sequence[str], spec: TaskSpec) -> dict[str, Any]:
    from tuneloop.evaluate.metrics import classification_metrics

    return classification_metrics(predictions, references, spec.labels)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "classification",
            "Text in, one label out; accuracy, macro-F1 and a confusion matrix.",
            _classification_spec,
            parse_label,
            _score_classification,
        ),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None
