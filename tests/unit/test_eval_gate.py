"""The release gate: each condition passes or fails on the numbers, and bad names fail before any work."""

from __future__ import annotations

import pytest

from tuneloop.config import ConfigError, validate_config
from tuneloop.config.schema import GateConfig
from tuneloop.evaluate.gate import check_gate_names, evaluate_gate

pytestmark = pytest.mark.unit


def comparison(delta, low, high):
    return {"delta": delta, "ci95": [low, high], "p_value": 0.01, "verdict": "better"}


METRICS = {
    "finetuned": {
        "accuracy": 0.93, "macro_f1": 0.91,
        "comparisons": {"base": {"macro_f1": comparison(0.30, 0.25, 0.35)}, "few_shot": {"macro_f1": comparison(0.04, -0.01, 0.09)}},
        "regression": {"pass_rate": 0.60, "format_bleed_rate": 0.05},
    },
    "base": {"accuracy": 0.60, "macro_f1": 0.61, "regression": {"pass_rate": 0.70, "format_bleed_rate": 0.0}},
    "few_shot": {"accuracy": 0.88, "macro_f1": 0.87},
}


def test_all_conditions_pass():
    gate = GateConfig(min_metric={"macro_f1": 0.9}, min_gain={"base": {"macro_f1": 0.05}}, max_regression_drop=0.2, max_format_bleed=0.1)
    result = evaluate_gate(gate, METRICS)
    assert result.passed and len(result.checks) == 4 and not result.failures


def test_each_failed_condition_is_named_with_its_numbers():
    gate = GateConfig(
        min_metric={"macro_f1": 0.95},
        min_gain={"few_shot": {"macro_f1": 0.05}},
        max_regression_drop=0.02,
        max_format_bleed=0.01,
    )
    result = evaluate_gate(gate, METRICS)
    assert not result.passed
    assert [c.condition for c in result.failures] == [
        "finetuned macro_f1 >= 0.95",
        "finetuned macro_f1 >= few_shot macro_f1 + 0.05",
        "regression pass rate drop <= 0.02",
        "format bleed <= 0.01",
    ]
    assert result.failures[0].detail == "finetuned macro_f1 = 0.9100"
    assert "0.700 -> finetuned 0.600" in result.failures[2].detail


def test_require_significant_fails_a_gain_whose_interval_includes_zero():
    lenient = GateConfig(min_gain={"few_shot": {"macro_f1": 0.03}})
    strict = GateConfig(min_gain={"few_shot": {"macro_f1": 0.03}}, require_significant=True)
    assert evaluate_gate(lenient, METRICS).passed
    result = evaluate_gate(strict, METRICS)
    assert not result.passed and "includes 0" in result.failures[0].detail
    assert evaluate_gate(GateConfig(min_gain={"base": {"macro_f1": 0.05}}, require_significant=True), METRICS).passed


def test_names_are_checked_before_evaluating():
    with pytest.raises(ValueError, match=r"gate: unknown metric\(s\) macro_f2"):
        check_gate_names(GateConfig(min_metric={"macro_f2": 0.5}), ["accuracy", "macro_f1"], ["finetuned", "base"])
    with pytest.raises(ValueError, match=r"gate.min_gain: baseline\(s\) few_shot are not evaluated; baselines in this run: base"):
        check_gate_names(GateConfig(min_gain={"few_shot": {"accuracy": 0.1}}), ["accuracy"], ["finetuned", "base"])
    check_gate_names(GateConfig(min_metric={"accuracy": 0.5}), ["accuracy"], ["finetuned"])


def test_gate_config_is_typed_and_strict(tiny_config):
    config = tiny_config(gate={"min_metric": {"macro_f1": 0.9}, "max_regression_drop": 0.02})
    assert config.gate.min_metric == {"macro_f1": 0.9}
    with pytest.raises(ConfigError, match="gate.min_metrics: unknown key"):
        tiny_config(gate={"min_metrics": {"macro_f1": 0.9}})
    with pytest.raises(ConfigError, match="gate.max_regression_drop needs regression_check: true"):
        tiny_config(gate={"max_regression_drop": 0.02}, regression_check=False)
    with pytest.raises(ConfigError, match="gate.max_format_bleed"):
        tiny_config(gate={"max_format_bleed": 2})
