"""Bootstrap intervals and paired tests: right on known cases, and they do not call noise a win."""

from __future__ import annotations

import numpy as np
import pytest

from tuneloop.evaluate.bootstrap import compare, confidence_report, mcnemar_p, point_estimate, replicates
from tuneloop.tasks import INVALID, TaskSpec, get_task
from tuneloop.tasks.base import mean_statistic

pytestmark = pytest.mark.unit

SPEC = TaskSpec("classification", None, ("a", "b", "c"))


def correct(values):
    return {"accuracy": mean_statistic(values)}


def test_interval_brackets_the_estimate_and_matches_the_binomial_width():
    rng = np.random.default_rng(0)
    values = (rng.random(400) < 0.7).astype(float)
    ci, _ = confidence_report({"s": correct(values)}, "s", 2000, seed=1)
    low, high = ci["s"]["accuracy"]
    p = values.mean()
    assert low < p < high
    normal_half_width = 1.96 * np.sqrt(p * (1 - p) / len(values))
    assert (high - low) / 2 == pytest.approx(normal_half_width, rel=0.15)


def test_same_seed_same_intervals():
    stats = {"s": correct([1, 0, 1, 1, 0, 1])}
    assert confidence_report(stats, "s", 300, 5) == confidence_report(stats, "s", 300, 5)


def test_identical_systems_are_not_different():
    values = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1] * 5
    _, comparisons = confidence_report({"finetuned": correct(values), "base": correct(values)}, "finetuned", 500, 0)
    result = comparisons["base"]["accuracy"]
    assert result["delta"] == 0 and result["p_value"] == 1.0 and result["mcnemar_p"] == 1.0
    assert result["verdict"] == "no significant difference" and result["significant"] is False


def test_a_small_gain_on_few_examples_is_noise_and_a_large_one_is_not():
    rng = np.random.default_rng(3)
    base = (rng.random(20) < 0.5).astype(float)
    slightly = base.copy()
    slightly[np.flatnonzero(base == 0)[:1]] = 1  # one more right out of 20
    _, small = confidence_report({"finetuned": correct(slightly), "base": correct(base)}, "finetuned", 1000, 0)
    assert small["base"]["accuracy"]["verdict"] == "no significant difference"
    much = np.ones(200)
    much[:20] = 0
    other = (rng.random(200) < 0.5).astype(float)
    _, large = confidence_report({"finetuned": correct(much), "base": correct(other)}, "finetuned", 1000, 0)
    assert large["base"]["accuracy"]["verdict"] == "better"
    assert large["base"]["accuracy"]["ci95"][0] > 0 and large["base"]["accuracy"]["p_value"] <= 0.002


def test_paired_comparison_sees_what_overlapping_intervals_hide():
    """Same examples hard for both: intervals overlap, but the paired difference is clearly positive."""
    rng = np.random.default_rng(7)
    difficulty = rng.random(300)
    base = (difficulty < 0.60).astype(float)
    finetuned = (difficulty < 0.68).astype(float)  # right wherever base is, and on 8% more
    ci, comparisons = confidence_report({"finetuned": correct(finetuned), "base": correct(base)}, "finetuned", 1000, 0)
    assert ci["finetuned"]["accuracy"][0] < ci["base"]["accuracy"][1]  # intervals overlap
    assert comparisons["base"]["accuracy"]["verdict"] == "better"


def test_mcnemar_exact_by_hand():
    a = np.array([1, 1, 1, 1, 0, 1, 1, 0], bool)
    b = np.array([0, 0, 0, 0, 0, 1, 1, 0], bool)
    # 4 discordant pairs, all favouring a: two-sided exact binomial p = 2 * 0.5**4
    assert mcnemar_p(a, b) == pytest.approx(0.125)


def test_compare_reports_the_sign_of_the_interval():
    assert compare(np.full(100, 0.6), np.full(100, 0.5), 0.1).verdict == "better"
    assert compare(np.full(100, 0.4), np.full(100, 0.5), -0.1).verdict == "worse"


def test_macro_f1_replicates_match_scikit_learn_on_resamples():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(11)
    references = list(rng.choice(list("abc"), 60))
    predictions = [r if rng.random() < 0.6 else rng.choice(["a", "b", INVALID]) for r in references]
    statistic = get_task("classification").statistics(predictions, references, SPEC)["macro_f1"]
    assert point_estimate(statistic) == pytest.approx(
        f1_score(references, predictions, labels=list("abc"), average="macro", zero_division=0)
    )
    values = replicates({"s": {"macro_f1": statistic}}, 50, seed=2)["s"]["macro_f1"]
    # rebuild the same resamples and score them with scikit-learn
    draw = np.random.default_rng(2).integers(0, 60, size=(50, 60))
    for row, value in zip(draw, values):
        expected = f1_score([references[i] for i in row], [predictions[i] for i in row], labels=list("abc"), average="macro", zero_division=0)
        assert value == pytest.approx(expected)


def test_systems_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="different numbers of examples"):
        replicates({"a": correct([1, 0]), "b": correct([1, 0, 1])}, 10, 0)


def test_zero_samples_means_no_intervals():
    ci, comparisons = confidence_report({"finetuned": correct([1, 0]), "base": correct([0, 0])}, "finetuned", 0, 0)
    assert ci == {"finetuned": {}, "base": {}} and comparisons == {}
