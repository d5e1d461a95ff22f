"""Free-form generation: text in, text out. Exact match, ROUGE-1/L and length statistics; optionally a judge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneloop.data.types import Conversation
from tuneloop.tasks.base import Statistic, Task, TaskSpec, mean_statistic


def _generation_spec(
    train: Sequence[Conversation], labels: tuple[str, ...] | None, system_prompt: str | None
) -> TaskSpec:
    """No framing of its own: the data's system turns, or ``system_prompt`` from the config, say what to do."""
    return TaskSpec("generation", system_prompt)


def _strip(output: str, spec: TaskSpec) -> str:
    return output.strip()


def _score(predictions: Sequence[str], references: Sequence[str], spec: TaskSpec) -> dict[str, Any]:
    from tuneloop.evaluate.text_metrics import generation_metrics

    return generation_metrics(predictions, references)


def _rouge_l(predictions: Sequence[str], references: Sequence[str], spec: TaskSpec) -> list[float]:
    from tuneloop.evaluate.text_metrics import rouge_l

    return [rouge_l(p, r) for p, r in zip(predictions, references)]


def _statistics(predictions: Sequence[str], references: Sequence[str], spec: TaskSpec) -> dict[str, Statistic]:
    from tuneloop.evaluate.text_metrics import exact_match, rouge_n

    return {
        "exact_match": mean_statistic([exact_match(p, r) for p, r in zip(predictions, references)]),
        "rouge1": mean_statistic([rouge_n(p, r, 1) for p, r in zip(predictions, references)]),
        "rougeL": mean_statistic(_rouge_l(predictions, references, spec)),
    }


GENERATION = Task(
    "generation",
    "Text in, text out; exact match, ROUGE-1/L, length statistics and an optional LLM judge.",
    _generation_spec,
    _strip,
    _score,
    headline=("exact_match", "rouge1", "rougeL"),
    statistics=_statistics,
    example_scores=_rouge_l,
)
