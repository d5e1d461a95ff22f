"""JSON-extraction metrics: valid JSON, JSON-Schema compliance, per-field exact match, and the failures.

A prediction is the reply as compact JSON or ``<invalid>`` (see :mod:`tuneloop.tasks.json_output`); the
reference is the expected object. Field scores compare JSON values exactly: ``"high"`` is not ``"High"``,
because the system consuming the object will not think so either.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuneloop.tasks.base import INVALID

MAX_FAILURES = 25


@dataclass(frozen=True)
class JsonExample:
    valid: bool
    compliant: bool | None  # None: no schema configured
    schema_error: str | None
    field_hits: dict[str, bool]
    field_score: float
    exact: bool


def schema_validator(schema: Mapping[str, Any] | None) -> Any:
    """A validator for the schema's own draft (``$schema``), after checking the schema itself."""
    if schema is None:
        return None
    from jsonschema.validators import validator_for

    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values as a consumer sees them: Python's ``True == 1`` would let ``{"urgent": 1}``
    match ``{"urgent": true}``; here a boolean equals only a boolean (numbers still compare by value)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return a == b


def _value(text: str) -> Any:
    return INVALID if text == INVALID else json.loads(text)


def per_example(
    predictions: Sequence[str], references: Sequence[str], schema: Mapping[str, Any] | None
) -> list[JsonExample]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    validator = schema_validator(schema)
    rows = []
    for prediction, reference in zip(predictions, references):
        predicted, expected = _value(prediction), _value(reference)
        valid = predicted is not INVALID
        compliant: bool | None = None
        error: str | None = None
        if validator is not None:
            if not valid:
                compliant, error = False, "not JSON"
            else:
                found = next(iter(sorted(validator.iter_errors(predicted), key=lambda e: list(e.path))), None)
                compliant = found is None
                if found is not None:
                    where = "/".join(str(p) for p in found.path) or "(root)"
                    error = f"{where}: {found.message}"
        keys = list(expected) if isinstance(expected, dict) else []
        hits = {k: isinstance(predicted, dict) and k in predicted and json_equal(predicted[k], expected[k]) for k in keys}
        exact = valid and json_equal(predicted, expected)
        score = sum(hits.values()) / len(hits) if hits else float(exact)
        rows.append(JsonExample(valid, compliant, error, hits, score, exact))
    return rows


def field_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    return [row.field_score for row in per_example(predictions, references, None)]


def json_metrics(
    predictions: Sequence[str], references: Sequence[str], schema: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Rates over all examples; per-field exact match over the examples whose reference has the field."""
    if not references:
        raise ValueError("no examples to score")
    rows = per_example(predictions, references, schema)
    n = len(rows)
    field_totals: Counter[str] = Counter()
    field_hits: Counter[str] = Counter()
    for row in rows:
        for key, hit in row.field_hits.items():
            field_totals[key] += 1
            field_hits[key] += hit
    failures = []
    for index, row in enumerate(rows):
        if len(failures) >= MAX_FAILURES:
            break
        if not row.valid:
            failures.append({"index": index, "kind": "invalid_json", "detail": "the reply is not one JSON value"})
        elif row.compliant is False:
            failures.append({"index": index, "kind": "schema", "detail": row.schema_error})
        elif not row.exact:
            wrong = sorted(k for k, hit in row.field_hits.items() if not hit)
            failures.append({"index": index, "kind": "fields", "detail": "wrong: " + ", ".join(wrong)})
    schema_errors = Counter(row.schema_error for row in rows if row.schema_error and row.valid)
    return {
        "n": n,
        "valid_json": sum(r.valid for r in rows),
        "valid_json_rate": sum(r.valid for r in rows) / n,
        "invalid": sum(not r.valid for r in rows),
        "schema_compliance_rate": None if schema is None else sum(bool(r.compliant) for r in rows) / n,
        "field_accuracy": sum(r.field_score for r in rows) / n,
        "exact_match": sum(r.exact for r in rows) / n,
        "per_field": {
            key: {"exact_match": field_hits[key] / field_totals[key], "support": field_totals[key]}
            for key in field_totals
        },
        "schema_errors": dict(schema_errors.most_common(10)),
        "failures": failures,
    }
