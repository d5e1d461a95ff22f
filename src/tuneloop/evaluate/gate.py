"""The release gate: named conditions on the evaluation, each passed or failed with the numbers behind it.

``tuneloop eval`` exits non-zero when any condition fails, so a CI job can refuse to ship a fine-tune that
is below a floor, not clearly better than what it replaces, or broke the model for everything else.
Conditions are checked against names *before* any generation runs: a typo in a metric name should cost a
second, not an evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tuneloop.config.schema import GateConfig


@dataclass(frozen=True)
class GateCheck:
    condition: str
    passed: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"condition": self.condition, "passed": self.passed, "detail": self.detail}


@dataclass(frozen=True)
class GateResult:
    checks: tuple[GateCheck, ...]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[GateCheck]:
        return [check for check in self.checks if not check.passed]

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [c.as_dict() for c in self.checks]}


def check_gate_names(gate: GateConfig | None, metric_names: Iterable[str], systems: Iterable[str]) -> None:
    """Raise ``ValueError`` for a gate that names a metric the task does not report or a baseline not evaluated."""
    if gate is None:
        return
    known, evaluated = set(metric_names), set(systems)
    named = [*gate.min_metric, *(m for table in gate.min_gain.values() for m in table)]
    unknown = sorted(set(named) - known)
    if unknown:
        raise ValueError(f"gate: unknown metric(s) {', '.join(unknown)}; this task reports {', '.join(sorted(known))}")
    missing = sorted(set(gate.min_gain) - (evaluated - {"finetuned"}))
    if missing:
        raise ValueError(
            f"gate.min_gain: baseline(s) {', '.join(missing)} are not evaluated; "
            f"baselines in this run: {', '.join(sorted(evaluated - {'finetuned'})) or 'none'}"
        )
    if gate.max_regression_drop is not None and "base" not in evaluated:
        raise ValueError(
            "gate.max_regression_drop compares the fine-tune with the base model on the regression prompts; "
            "add base to baselines (this run evaluates: " + (", ".join(sorted(evaluated - {"finetuned"})) or "no baseline") + ")"
        )


def _value(metrics: Mapping[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def evaluate_gate(gate: GateConfig, metrics: Mapping[str, Mapping[str, Any]]) -> GateResult:
    """Every configured condition, in config order, against ``metrics.json``-shaped results."""
    finetuned = metrics["finetuned"]
    checks: list[GateCheck] = []
    for name, floor in gate.min_metric.items():
        value = _value(finetuned, name)
        ok = value is not None and value >= floor
        shown = "n/a" if value is None else f"{value:.4f}"
        checks.append(GateCheck(f"finetuned {name} >= {floor:g}", ok, f"finetuned {name} = {shown}"))
    comparisons = finetuned.get("comparisons", {})
    for baseline, table in gate.min_gain.items():
        for name, gain in table.items():
            ours, theirs = _value(finetuned, name), _value(metrics.get(baseline, {}), name)
            if ours is None or theirs is None:
                checks.append(GateCheck(f"finetuned {name} >= {baseline} + {gain:g}", False, f"{name} not available"))
                continue
            ok = ours - theirs >= gain
            detail = f"{ours:.4f} vs {theirs:.4f} ({ours - theirs:+.4f})"
            if gate.require_significant:
                comparison = comparisons.get(baseline, {}).get(name)
                significant = comparison is not None and comparison["ci95"][0] > 0
                ok = ok and significant
                if comparison is None:
                    detail += "; no significance test (bootstrap_samples: 0)"
                else:
                    low, high = comparison["ci95"]
                    detail += f"; 95% CI of the gain [{low:+.4f}, {high:+.4f}]" + ("" if significant else " includes 0")
            checks.append(GateCheck(f"finetuned {name} >= {baseline} {name} + {gain:g}", ok, detail))
    regression = finetuned.get("regression")
    base_regression = metrics.get("base", {}).get("regression")
    if gate.max_regression_drop is not None:
        if regression is None or base_regression is None:
            checks.append(GateCheck("regression check", False, "needs the regression check on base and finetuned"))
        else:
            drop = base_regression["pass_rate"] - regression["pass_rate"]
            checks.append(
                GateCheck(
                    f"regression pass rate drop <= {gate.max_regression_drop:g}",
                    drop <= gate.max_regression_drop + 1e-12,
                    f"base {base_regression['pass_rate']:.3f} -> finetuned {regression['pass_rate']:.3f} ({-drop:+.3f})",
                )
            )
    if gate.max_format_bleed is not None:
        rate = None if regression is None else regression.get("format_bleed_rate")
        checks.append(
            GateCheck(
                f"format bleed <= {gate.max_format_bleed:g}",
                rate is not None and rate <= gate.max_format_bleed,
                "n/a" if rate is None else f"finetuned answers {rate:.3f} of general prompts in the task's format",
            )
        )
    return GateResult(tuple(checks))
