"""JSON extraction: text in, one JSON object out (e.g. a ticket -> ``{"queue", "priority", ...}``).

A reply counts as JSON only if the whole reply parses: a parser in production does ``json.loads(reply)``
and has no use for an object wrapped in prose or a Markdown fence. Scoring adds JSON-Schema compliance
(schema from the config's ``json_schema``) and per-field exact match against the reference object.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tuneloop.data.types import Conversation
from tuneloop.tasks.base import INVALID, Statistic, Task, TaskSpec, mean_statistic


def json_prompt(fields: Sequence[str]) -> str:
    keys = ", ".join(fields)
    return (
        f"Extract the requested information from the message. Answer with one compact JSON object with the "
        f"keys {keys}, and nothing else."
    )


def load_json(text: str) -> Any:
    """The JSON value of the whole reply, or :data:`INVALID` when the reply is not exactly one JSON value."""
    try:
        return json.loads(text.strip())
    except (json.JSONDecodeError, RecursionError):
        return INVALID


def canonical(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _json_spec(train: Sequence[Conversation], labels: tuple[str, ...] | None, system_prompt: str | None) -> TaskSpec:
    """The answer keys, read from the training answers (each must be a JSON object), in first-seen order."""
    fields: dict[str, None] = {}
    for conversation in train:
        value = load_json(conversation.answer)
        if not isinstance(value, dict):
            kind = "not valid JSON" if value is INVALID else f"a JSON {type(value).__name__}, not an object"
            raise ValueError(f"{conversation.source}: task json needs a JSON object as the answer, got {kind}")
        fields.update(dict.fromkeys(value))
    if not fields:
        raise ValueError("task json: the training answers are empty objects; there is nothing to extract")
    return TaskSpec("json", system_prompt or json_prompt(list(fields)), fields=tuple(fields))


def parse_json_answer(output: str, spec: TaskSpec) -> str:
    """The reply as compact JSON (key order kept), or :data:`INVALID`."""
    value = load_json(output)
    return INVALID if value is INVALID else canonical(value)


def _reference(conversation: Conversation, spec: TaskSpec) -> str:
    reference = parse_json_answer(conversation.answer, spec)
    if reference == INVALID:
        raise ValueError(f"{conversation.source}: the expected answer is not valid JSON")
    return reference


def _score(predictions: Sequence[str], references: Sequence[str], spec: TaskSpec) -> dict[str, Any]:
    from tuneloop.evaluate.json_metrics import json_metrics

    return json_metrics(predictions, references, spec.json_schema)


def _field_scores(predictions: Sequence[str], references: Sequence[str], spec: TaskSpec) -> list[float]:
    from tuneloop.evaluate.json_metrics import field_scores

    return field_scores(predictions, references)


def _statistics(predictions: Sequence[str], references: Sequence[str], spec: TaskSpec) -> dict[str, Statistic]:
    from tuneloop.evaluate.json_metrics import per_example

    rows = per_example(predictions, references, spec.json_schema)
    statistics = {
        "valid_json_rate": mean_statistic([r.valid for r in rows]),
        "schema_compliance_rate": mean_statistic([bool(r.compliant) for r in rows]),
        "field_accuracy": mean_statistic([r.field_score for r in rows]),
        "exact_match": mean_statistic([r.exact for r in rows]),
    }
    if spec.json_schema is None:
        del statistics["schema_compliance_rate"]
    return statistics


def _looks_like_json(output: str, spec: TaskSpec) -> bool:
    """A reply that is a JSON object, or opens like one and uses the task's keys: format bleed."""
    if isinstance(load_json(output), dict):
        return True
    text = output.lstrip().removeprefix("```json").lstrip()
    return text.startswith("{") and any(f'"{key}"' in text for key in spec.fields)


JSON_TASK = Task(
    "json",
    "Text in, one JSON object out; valid-JSON and schema-compliance rates, per-field exact match.",
    _json_spec,
    parse_json_answer,
    _score,
    headline=("valid_json_rate", "schema_compliance_rate", "field_accuracy", "exact_match"),
    statistics=_statistics,
    example_scores=_field_scores,
    looks_like_output=_looks_like_json,
    reference_of=_reference,
)
