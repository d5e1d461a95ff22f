"""JSON and generation metrics against hand-computed values; every task's resampling form equals its score."""

from __future__ import annotations

import json
import random

import pytest

from tuneloop.evaluate.bootstrap import point_estimate
from tuneloop.evaluate.json_metrics import json_metrics
from tuneloop.evaluate.text_metrics import generation_metrics, lcs_length, rouge_l, rouge_n
from tuneloop.tasks import INVALID, TaskSpec, get_task

pytestmark = pytest.mark.unit

SCHEMA = {
    "type": "object",
    "required": ["queue", "priority"],
    "additionalProperties": False,
    "properties": {"queue": {"enum": ["billing", "bug"]}, "priority": {"enum": ["low", "high"]}},
}


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


REFERENCES = [compact({"queue": "billing", "priority": "high"})] * 4
PREDICTIONS = [
    compact({"queue": "billing", "priority": "high"}),  # exact
    compact({"queue": "billing", "priority": "low"}),  # one field wrong, compliant
    compact({"queue": "billing", "priority": "HIGH"}),  # one field wrong, not compliant (enum)
    INVALID,
]


def test_json_metrics_by_hand():
    m = json_metrics(PREDICTIONS, REFERENCES, SCHEMA)
    assert m["n"] == 4 and m["valid_json"] == 3 and m["invalid"] == 1
    assert m["valid_json_rate"] == pytest.approx(0.75)
    assert m["schema_compliance_rate"] == pytest.approx(0.5)
    assert m["exact_match"] == pytest.approx(0.25)
    assert m["per_field"] == {"queue": {"exact_match": 0.75, "support": 4}, "priority": {"exact_match": 0.25, "support": 4}}
    assert m["field_accuracy"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    kinds = [(f["index"], f["kind"]) for f in m["failures"]]
    assert kinds == [(1, "fields"), (2, "schema"), (3, "invalid_json")]
    assert "priority" in m["failures"][1]["detail"] and "'HIGH' is not one of" in m["failures"][1]["detail"]
    assert json_metrics(PREDICTIONS, REFERENCES, None)["schema_compliance_rate"] is None


def test_rouge_and_lcs_by_hand():
    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    # ROUGE-1: overlap {the, cat} = 2, P = 2/3, R = 2/4 -> F = 4/7
    assert rouge_n("the cat sat", "the cat is here", 1) == pytest.approx(4 / 7)
    assert rouge_n("the cat sat", "the cat is here", 2) == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert rouge_l("The cat, sat!", "the cat is here") == pytest.approx(4 / 7)
    assert rouge_l("", "x") == 0.0


def test_generation_metrics_by_hand():
    m = generation_metrics(["Paris", "it is  four", ""], ["Paris", "it is four", "yes"])
    assert m["exact_match"] == pytest.approx(2 / 3)
    assert m["rouge1"] == pytest.approx(2 / 3)
    assert m["empty"] == 1
    assert m["length_words"]["mean"] == pytest.approx(4 / 3)
    assert m["length_ratio"] == pytest.approx(4 / 5)


@pytest.mark.parametrize("task_name", ["classification", "json", "generation"])
def test_resampling_form_equals_the_metric(task_name):
    rng = random.Random(task_name)
    if task_name == "classification":
        spec = TaskSpec("classification", None, ("a", "b", "c", "d"))
        references = [rng.choice("abc") for _ in range(50)]  # label d never occurs: still averaged in, as F1 0
        predictions = [r if rng.random() < 0.6 else rng.choice(["a", "b", "d", INVALID]) for r in references]
    elif task_name == "json":
        spec = TaskSpec("json", None, fields=("queue", "priority"), json_schema=SCHEMA)
        references = [compact({"queue": rng.choice(["billing", "bug"]), "priority": rng.choice(["low", "high"])}) for _ in range(50)]
        predictions = [rng.choice([r, compact({"queue": "bug", "priority": "urgent"}), INVALID, compact([1])]) for r in references]
    else:
        spec = TaskSpec("generation", None)
        words = "the cat sat on a mat today".split()
        references = [" ".join(rng.choices(words, k=6)) for _ in range(50)]
        predictions = [rng.choice([r, " ".join(rng.choices(words, k=4))]) for r in references]
    task = get_task(task_name)
    scored = task.score(predictions, references, spec)
    statistics = task.statistics(predictions, references, spec)
    assert set(statistics) == set(task.headline)
    for name, statistic in statistics.items():
        assert point_estimate(statistic) == pytest.approx(scored[name]), name
