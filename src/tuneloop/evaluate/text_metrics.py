"""Text-generation metrics: exact match, ROUGE-1/2/L (F-measure over word tokens) and length statistics.

Implemented here rather than through a ROUGE package: the definitions are a few lines, and owning them
keeps tokenisation (lower-cased Unicode word characters, no stemming) stated and stable across versions.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

_WORD = re.compile(r"\w+", re.UNICODE)
MAX_LCS_TOKENS = 2000  # ROUGE-L is quadratic; longer texts are compared on their first 2000 tokens


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def exact_match(prediction: str, reference: str) -> float:
    """Equal after trimming and collapsing whitespace; case and punctuation count."""
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def _f1(overlap: float, predicted: int, expected: int) -> float:
    if overlap == 0 or predicted == 0 or expected == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / expected
    return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: str, reference: str, n: int) -> float:
    p, r = words(prediction), words(reference)
    p_grams = Counter(tuple(p[i : i + n]) for i in range(len(p) - n + 1))
    r_grams = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
    overlap = sum((p_grams & r_grams).values())
    return _f1(overlap, sum(p_grams.values()), sum(r_grams.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence by the classic row-by-row dynamic programme (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    p, r = words(prediction)[:MAX_LCS_TOKENS], words(reference)[:MAX_LCS_TOKENS]
    return _f1(lcs_length(p, r), len(p), len(r))


def _length_stats(lengths: Sequence[int]) -> dict[str, float]:
    ordered = sorted(lengths)
    return {
        "mean": statistics.fmean(ordered),
        "median": float(statistics.median(ordered)),
        "p95": float(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]),
        "max": float(ordered[-1]),
    }


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
    n = len(references)
    predicted_words = [len(words(p)) for p in predictions]
    reference_words = [len(words(r)) for r in references]
    return {
        "n": n,
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
        "rouge1": sum(rouge_n(p, r, 1) for p, r in zip(predictions, references)) / n,
        "rouge2": sum(rouge_n(p, r, 2) for p, r in zip(predictions, references)) / n,
        "rougeL": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "empty": sum(1 for p in predictions if not p.strip()),
        "length_words": _length_stats(predicted_words),
        "reference_length_words": _length_stats(reference_words),
        "length_ratio": sum(predicted_words) / max(sum(reference_words), 1),
    }
