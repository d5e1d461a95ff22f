"""Confidence for every headline number: bootstrap 95% intervals and paired tests between systems.

All systems answer the same test examples, so comparisons are *paired*: each bootstrap replicate draws one
multiset of example indices and scores every system on it, and the difference between two systems is
taken replicate by replicate. That removes the example-difficulty noise two independent intervals would
carry, so a real 2-point gain is visible, and an unreal one is not called a win.

Metrics come in resampling form (:class:`tuneloop.tasks.Statistic`): per-example feature rows whose
column sums determine the metric. A replicate is then a vector of example counts, and a block of
replicates is one matrix product with the feature matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuneloop.tasks import Statistic

CONFIDENCE = 0.95
_BLOCK_CELLS = 20_000_000  # replicates x examples per block: bounds memory at ~160 MB for any test size


@dataclass(frozen=True)
class Comparison:
    """Fine-tuned minus a baseline on one metric, with its paired interval and two-sided p-value."""

    delta: float
    low: float
    high: float
    p_value: float
    verdict: str  # "better", "worse" or "no significant difference"

    def as_dict(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "ci95": [self.low, self.high],
            "p_value": self.p_value,
            "verdict": self.verdict,
            "significant": self.verdict != "no significant difference",
        }


def point_estimate(statistic: Statistic) -> float:
    sums = np.asarray(statistic.features, dtype=np.float64).sum(axis=0, keepdims=True)
    return float(statistic.reduce(sums)[0])


def replicates(
    systems: Mapping[str, Mapping[str, Statistic]], samples: int, seed: int
) -> dict[str, dict[str, np.ndarray]]:
    """``samples`` bootstrap values of every metric of every system, on shared (paired) resamples."""
    sizes = {len(np.asarray(s.features)) for metrics in systems.values() for s in metrics.values()}
    if len(sizes) != 1:
        raise ValueError(f"systems were scored on different numbers of examples: {sorted(sizes)}")
    (n,) = sizes
    rng = np.random.default_rng(seed)
    block = max(1, min(samples, _BLOCK_CELLS // max(n, 1)))
    out: dict[str, dict[str, list[np.ndarray]]] = {name: {m: [] for m in metrics} for name, metrics in systems.items()}
    done = 0
    while done < samples:
        size = min(block, samples - done)
        drawn = rng.integers(0, n, size=(size, n)) + np.arange(size)[:, None] * n
        counts = np.bincount(drawn.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)
        for name, metrics in systems.items():
            for metric, statistic in metrics.items():
                out[name][metric].append(statistic.reduce(counts @ np.asarray(statistic.features, dtype=np.float64)))
        done += size
    return {name: {m: np.concatenate(v) for m, v in metrics.items()} for name, metrics in out.items()}


def interval(values: np.ndarray) -> list[float]:
    """Percentile interval at :data:`CONFIDENCE`."""
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def compare(a: np.ndarray, b: np.ndarray, delta: float) -> Comparison:
    """``a - b`` from paired replicates. The p-value is the two-sided bootstrap tail mass at zero, floored
    at ``1/samples`` (a bootstrap cannot resolve smaller probabilities)."""
    differences = a - b
    low, high = interval(differences)
    tail = min(float(np.mean(differences <= 0)), float(np.mean(differences >= 0)))
    p_value = min(1.0, max(2 * tail, 1.0 / len(differences)))
    if low > 0:
        verdict = "better"
    elif high < 0:
        verdict = "worse"
    else:
        verdict = "no significant difference"
    return Comparison(delta, low, high, p_value, verdict)


def mcnemar_p(a_correct: np.ndarray, b_correct: np.ndarray) -> float:
    """Exact McNemar test on per-example right/wrong: only the examples where the two systems disagree count."""
    from scipy.stats import binomtest

    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def is_binary(statistic: Statistic) -> bool:
    """A metric that is the mean of a 0/1 column (accuracy, exact match): McNemar applies to it."""
    features = np.asarray(statistic.features)
    return features.ndim == 2 and features.shape[1] == 1 and bool(np.isin(features, (0.0, 1.0)).all())


def confidence_report(
    systems: Mapping[str, Mapping[str, Statistic]], reference: str, samples: int, seed: int
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, dict[str, Any]]]]:
    """Intervals for every system and metric, and ``reference`` (the fine-tune) compared with each other system.

    Returns ``(ci95, comparisons)``: ``ci95[system][metric] = [low, high]`` and
    ``comparisons[baseline][metric] = Comparison.as_dict()`` (plus ``mcnemar_p`` for 0/1 metrics).
    """
    if samples <= 0 or not systems:
        return {name: {} for name in systems}, {}
    values = replicates(systems, samples, seed)
    ci95 = {name: {m: interval(v) for m, v in metrics.items()} for name, metrics in values.items()}
    comparisons: dict[str, dict[str, dict[str, Any]]] = {}
    if reference not in systems:
        return ci95, comparisons
    for baseline in systems:
        if baseline == reference:
            continue
        table: dict[str, dict[str, Any]] = {}
        for metric, statistic in systems[reference].items():
            if metric not in systems[baseline]:
                continue
            other = systems[baseline][metric]
            delta = point_estimate(statistic) - point_estimate(other)
            result = compare(values[reference][metric], values[baseline][metric], delta).as_dict()
            if is_binary(statistic) and is_binary(other):
                result["mcnemar_p"] = mcnemar_p(np.asarray(statistic.features)[:, 0], np.asarray(other.features)[:, 0])
            table[metric] = result
        comparisons[baseline] = table
    return ci95, comparisons
