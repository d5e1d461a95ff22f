"""Classification: text in, one label out. Scored by accuracy, macro/weighted F1 and a confusion matrix."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tuneloop.data.types import Conversation
from tuneloop.tasks.base import INVALID, Statistic, Task, TaskSpec, mean_statistic


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


def _score(predictions: Sequence[str], references: Sequence[str], spec: TaskSpec) -> dict[str, Any]:
    from tuneloop.evaluate.metrics import classification_metrics

    return classification_metrics(predictions, references, spec.labels)


def _correct(predictions: Sequence[str], references: Sequence[str], spec: TaskSpec) -> list[float]:
    return [float(p == r) for p, r in zip(predictions, references)]


def _statistics(predictions: Sequence[str], references: Sequence[str], spec: TaskSpec) -> dict[str, Statistic]:
    """Accuracy and macro-F1 from per-example one-hot counts (true positive, predicted, actual per label).

    Macro-F1 averages over every configured label, a label with no support and no prediction counting 0,
    exactly as scikit-learn's ``f1_score(labels=..., average="macro", zero_division=0)`` does.
    """
    import numpy as np

    index = {label: i for i, label in enumerate(spec.labels)}
    n, k = len(references), len(spec.labels)
    predicted, actual = np.zeros((n, k)), np.zeros((n, k))
    for row, (p, r) in enumerate(zip(predictions, references)):
        if p in index:
            predicted[row, index[p]] = 1.0
        if r in index:
            actual[row, index[r]] = 1.0
    features = np.concatenate([predicted * actual, predicted, actual], axis=1)

    def macro_f1(sums: Any) -> Any:
        tp, pred, act = sums[:, :k], sums[:, k : 2 * k], sums[:, 2 * k :]
        denominator = pred + act
        f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        return f1.mean(axis=1)

    return {"accuracy": mean_statistic(_correct(predictions, references, spec)), "macro_f1": Statistic(features, macro_f1)}


def _is_bare_label(output: str, spec: TaskSpec) -> bool:
    """A reply that is nothing but one of the labels: the fine-tune answering a general question with a queue."""
    text = _normalise(output)
    return bool(text) and text in {_normalise(label) for label in spec.labels}


CLASSIFICATION = Task(
    "classification",
    "Text in, one label out; accuracy, macro-F1 and a confusion matrix.",
    _classification_spec,
    parse_label,
    _score,
    headline=("accuracy", "macro_f1"),
    statistics=_statistics,
    example_scores=_correct,
    looks_like_output=_is_bare_label,
)
