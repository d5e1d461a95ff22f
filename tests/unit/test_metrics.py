"""Answer parsing and classification metrics, checked against hand-computed values."""

from __future__ import annotations

import pytest

from tuneloop.evaluate.metrics import classification_metrics
from tuneloop.tasks import INVALID, TaskSpec, parse_label

pytestmark = pytest.mark.unit

SPEC = TaskSpec("classification", None, ("billing", "bug_report", "onboarding"))


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("billing", "billing"),
        ("  Billing.", "billing"),
        ("bug report", "bug_report"),
        ("BUG-REPORT", "bug_report"),
        ("onboarding: the user asks how to start", "onboarding"),
        ("This is about billing.", "billing"),
        ("billing or onboarding", "billing"),
        ("maybe bug_report, maybe billing?", INVALID),
        ("I cannot help with that", INVALID),
        ("", INVALID),
    ],
)
def test_parse_label(output, expected):
    assert parse_label(output, SPEC) == expected


def test_metrics_match_hand_computation():
    refs = ["billing", "billing", "bug_report", "onboarding"]
    preds = ["billing", INVALID, "bug_report", "billing"]
    m = classification_metrics(preds, refs, SPEC.labels)
    assert m["accuracy"] == pytest.approx(0.5)
    # billing: P=1/2 R=1/2 F1=0.5; bug_report: F1=1; onboarding: F1=0
    assert m["macro_f1"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["invalid"] == 1 and m["invalid_rate"] == pytest.approx(0.25)
    assert m["per_label"]["billing"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    labels = m["confusion"]["labels"]
    matrix = m["confusion"]["matrix"]
    assert matrix[labels.index("billing")][labels.index(INVALID)] == 1
    assert matrix[labels.index("onboarding")][labels.index("billing")] == 1
    assert sum(map(sum, matrix)) == 4


def test_metrics_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="3 predictions for 2 references"):
        classification_metrics(["a", "b", "c"], ["a", "b"], ("a", "b"))
