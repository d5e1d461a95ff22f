"""What every task type provides: the spec a run remembers, and the hooks evaluation calls.

Kept free of heavy imports (numpy, scikit-learn, jsonschema load inside the hooks), because config
validation imports the task registry on every command.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneloop.data.types import Conversation

INVALID = "<invalid>"


@dataclass(frozen=True)
class TaskSpec:
    """What a trained run must remember about its task to be used later (predict, serve, eval).

    ``fields`` are the keys of a JSON task's answers (read from the training data); ``json_schema`` is the
    schema evaluation checks answers against. Both are empty for tasks that have none, and absent keys in
    an older ``tuneloop.json`` read as empty, so runs trained before they existed still load.
    """

    task: str
    system_prompt: str | None
    labels: tuple[str, ...] = field(default=())
    fields: tuple[str, ...] = field(default=())
    json_schema: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"task": self.task, "system_prompt": self.system_prompt, "labels": list(self.labels)}
        if self.fields:
            data["fields"] = list(self.fields)
        if self.json_schema is not None:
            data["json_schema"] = dict(self.json_schema)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        return cls(
            data["task"],
            data.get("system_prompt"),
            tuple(data.get("labels") or ()),
            tuple(data.get("fields") or ()),
            data.get("json_schema"),
        )


@dataclass(frozen=True)
class Statistic:
    """A metric written as a function of per-example sufficient statistics.

    ``features`` is an ``(n, k)`` array, one row per example; ``reduce`` maps column sums ``(B, k)`` over a
    sample of ``n`` examples to the metric ``(B,)``. Accuracy is one column (correct) and a division;
    macro-F1 is three one-hot blocks (true positives, predicted, actual) and the F1 formula. Written this
    way, a thousand bootstrap resamples are one matrix product instead of a thousand metric calls.
    """

    features: Any
    reduce: Callable[[Any], Any]


def label_or_answer(conversation: Conversation, spec: TaskSpec) -> str:
    """The reference a prediction is scored against: the row's label, else its final assistant turn."""
    return conversation.label if conversation.label is not None else conversation.answer


ScoreFn = Callable[[Sequence[str], Sequence[str], TaskSpec], dict[str, Any]]
StatisticsFn = Callable[[Sequence[str], Sequence[str], TaskSpec], dict[str, Statistic]]


@dataclass(frozen=True)
class Task:
    """A task type: framing (``make_spec``), reading answers (``parse_answer``) and scoring.

    ``headline`` names the metrics every report leads with (and bootstraps); ``statistics`` returns them in
    resampling form; ``example_scores`` gives each example a score in [0, 1] so reports can sort failures;
    ``looks_like_output`` recognises the task's own answer format in a reply to an unrelated prompt,
    which is how the regression check measures format bleed.
    """

    name: str
    description: str
    make_spec: Callable[[Sequence[Conversation], tuple[str, ...] | None, str | None], TaskSpec]
    parse_answer: Callable[[str, TaskSpec], str]
    score: ScoreFn
    headline: tuple[str, ...] = ()
    statistics: StatisticsFn | None = None
    example_scores: Callable[[Sequence[str], Sequence[str], TaskSpec], list[float]] | None = None
    looks_like_output: Callable[[str, TaskSpec], bool] | None = None
    reference_of: Callable[[Conversation, TaskSpec], str] = label_or_answer


def mean_statistic(values: Sequence[float]) -> Statistic:
    """The mean of a per-example value (accuracy, valid rate, ROUGE...) in resampling form."""
    import numpy as np

    column = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    n = max(len(column), 1)
    return Statistic(column, lambda sums: sums[:, 0] / n)
