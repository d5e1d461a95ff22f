"""Classification metrics through scikit-learn, with invalid answers kept visible rather than dropped."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneloop.tasks import INVALID


def classification_metrics(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro/weighted F1, per-label precision/recall and the confusion matrix.

    Invalid answers are wrong for every metric; macro-F1 averages over the real labels only, so an
    invalid answer lowers recall of its true label without inventing a class to average over.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
    label_list = list(labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        references, predictions, labels=label_list, zero_division=0
    )
    matrix = confusion_matrix(references, predictions, labels=[*label_list, INVALID])
    return {
        "n": len(references),
        "accuracy": float(accuracy_score(references, predictions)),
        "macro_f1": float(f1_score(references, predictions, labels=label_list, average="macro", zero_division=0)),
        "weighted_f1": float(
            f1_score(references, predictions, labels=label_list, average="weighted", zero_division=0)
        ),
        "invalid": sum(1 for p in predictions if p == INVALID),
        "invalid_rate": sum(1 for p in predictions if p == INVALID) / len(predictions),
        "per_label": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(label_list, precision, recall, f1, support)
        },
        "confusion": {"labels": [*label_list, INVALID], "matrix": matrix[:, :].tolist()},
    }
