"""``tuneloop eval``: run the evaluation stage and print its verdict; exit 3 when the gate fails."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from tuneloop.config import RunConfig

GATE_FAILED_EXIT = 3
SYSTEM_NAMES = {"base": "base model, zero-shot", "few_shot": "base model, few-shot", "finetuned": "fine-tuned"}


def _name(system: str) -> str:
    return SYSTEM_NAMES.get(system, f"{system} (endpoint)")


def headline_of(metrics: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    """The headline metrics of whichever task produced ``metrics`` (the first task whose metrics are all present)."""
    from tuneloop.tasks import TASKS

    sample = next(iter(metrics.values()), {})
    for task in TASKS.values():
        if task.headline and task.headline[0] in sample:
            return tuple(m for m in task.headline if m in sample)
    return ()


def _value(values: Mapping[str, Any], name: str) -> str:
    value = values.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    interval = (values.get("ci95") or {}).get(name)
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def metrics_table(metrics: Mapping[str, Mapping[str, Any]], title: str = "evaluation", headline: tuple[str, ...] | None = None) -> Table:
    """One row per system: the task's headline metrics with their 95% intervals, and invalid answers."""
    names = headline or headline_of(metrics)
    table = Table(title=title)
    table.add_column("model")
    for name in names:
        table.add_column(name.replace("_", " ") + " [95% CI]", justify="right")
    table.add_column("invalid answers", justify="right")
    ordered = [s for s in ("base", "few_shot") if s in metrics] + [s for s in metrics if s not in SYSTEM_NAMES] + ["finetuned"]
    for system in ordered:
        if system not in metrics:
            continue
        values = metrics[system]
        invalid = f"{values['invalid']}/{values['n']}" if "invalid" in values else "-"
        table.add_row(_name(system), *[_value(values, n) for n in names], invalid, style="bold" if system == "finetuned" else None)
    return table


def comparisons_table(metrics: Mapping[str, Mapping[str, Any]]) -> Table | None:
    comparisons = metrics.get("finetuned", {}).get("comparisons") or {}
    if not comparisons:
        return None
    table = Table(title="fine-tuned vs baselines (paired bootstrap)")
    for column in ("baseline", "metric", "difference [95% CI]", "p", "verdict"):
        table.add_column(column, justify="right" if column in ("difference [95% CI]", "p") else "left")
    for baseline, rows in comparisons.items():
        for metric, c in rows.items():
            style = {"better": "green", "worse": "red"}.get(c["verdict"], "dim")
            table.add_row(
                _name(baseline), metric, f"{c['delta']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]",
                f"{c['p_value']:.4f}", f"[{style}]{c['verdict']}[/]",
            )
    return table


def regression_table(metrics: Mapping[str, Mapping[str, Any]]) -> Table | None:
    """Base vs fine-tune on the general prompts; the fine-tune alone when the base was not evaluated."""
    base, ours = metrics.get("base", {}).get("regression"), metrics.get("finetuned", {}).get("regression")
    if not ours:
        return None
    title = "regression check (general prompts, no task system prompt)"
    table = Table(title=title if base else title + "; no base model evaluated, nothing to compare with")
    columns = ("", "base", "fine-tuned", "change [95% CI]") if base else ("", "fine-tuned")
    for column in columns:
        table.add_column(column, justify="left" if not column else "right")
    for name, label in (("pass_rate", "passed"), ("format_bleed_rate", "in the task's format")):
        if ours.get(name) is None:
            continue
        if not base:
            table.add_row(label, f"{ours[name]:.3f}")
            continue
        c = (ours.get("vs_base") or {}).get(name)
        change = "-" if c is None else f"{c['delta']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"
        table.add_row(label, f"{base[name]:.3f}", f"{ours[name]:.3f}", change)
    return table


def print_result(console: Console, result: Any) -> None:
    console.print(metrics_table(result.metrics, headline=result.headline))
    if not any(system != "finetuned" for system in result.metrics):
        console.print("no baseline evaluated (baselines: []): nothing says whether the fine-tune beats the base model",
                      style="yellow", highlight=False, markup=False)
    for table in (comparisons_table(result.metrics), regression_table(result.metrics)):
        if table is not None:
            console.print(table)
    judge = result.judge
    if judge:
        for system, entry in judge.items():
            if isinstance(entry, dict) and judge["mode"] == "pointwise" and entry["mean_score"] is not None:
                console.print(f"judge score, {_name(system)}: {entry['mean_score']:.2f} / 10")
            elif isinstance(entry, dict) and judge["mode"] == "pairwise" and entry["win_rate"] is not None:
                console.print(f"judge: fine-tuned vs {_name(system)}: win rate {entry['win_rate']:.3f} "
                              f"({entry['wins']} wins, {entry['ties']} ties, {entry['losses']} losses)")
    console.print(f"predictions: {result.predictions_path}")
    if result.report_path is not None:
        console.print(f"report: {result.report_path}")


def print_gate(console: Console, gate: Any) -> None:
    for check in gate.checks:
        mark = "[green]pass[/]" if check.passed else "[bold red]FAIL[/]"
        console.print(f"gate {mark}  {check.condition}  ({check.detail})", highlight=False)
    if gate.passed:
        console.print("[green]gate passed[/]")
    else:
        failed = "; ".join(c.condition for c in gate.failures)
        console.print(f"[bold red]gate failed:[/] {failed}", highlight=False)


def evaluate(console: Console, config: RunConfig) -> None:
    from tuneloop import evaluate as evaluate_stage
    from tuneloop.cli.progress import RichEvalProgress

    with RichEvalProgress(console) as progress:
        result = evaluate_stage.run(config, progress=progress)
    print_result(console, result)
    if result.gate is not None:
        print_gate(console, result.gate)
        if not result.gate.passed:
            raise typer.Exit(GATE_FAILED_EXIT)  # commands.guarded lets typer's own exits through
