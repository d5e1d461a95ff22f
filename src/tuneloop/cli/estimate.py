"""``tuneloop estimate CONFIG``: the GPU memory a run needs, and which GPUs it fits, before training."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from tuneloop.cli.commands import guarded
from tuneloop.config import load_config, parse_override

if TYPE_CHECKING:
    from tuneloop.train.estimate import EstimateResult
    from tuneloop.train.fast.memory import CheckpointPlan

console = Console()


def estimate_command(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key: --set batch_size=4")] = None,
    trained_fraction: Annotated[
        float, typer.Option(help="Share of tokens that carry loss (1 = every token: an upper bound).", min=0.0, max=1.0)
    ] = 1.0,
) -> None:
    """Estimate GPU memory (weights, adapters, optimizer, gradients, activations) and which GPUs it fits."""
    guarded(console, lambda: _estimate(config, set_ or [], trained_fraction))


def _estimate(path: Path, overrides: list[str], trained_fraction: float) -> None:
    from tuneloop.train import estimate

    config = load_config(path, dict(parse_override(o) for o in overrides))
    result = estimate.run(config, trained_fraction=trained_fraction)
    s = result.config_summary
    console.print(
        f"[bold]{s['base_model']}[/] with {s['adapter']}, optimizer {s['optimizer']}, batch {s['batch_size']} x "
        f"{s['max_seq_len']} tokens; {result.trainable_params / 1e6:.1f}M of {result.total_params / 1e6:.1f}M "
        "parameters trained"
    )
    table = Table(title="estimated GPU memory (GiB)")
    table.add_column("component")
    table.add_column("no checkpointing", justify="right")
    table.add_column("gradient checkpointing", justify="right")
    off, on = result.without_checkpointing, result.with_checkpointing
    for key in off.components:
        table.add_row(key.replace("_", " "), _gib(off.components[key]), _gib(on.components[key]))
    table.add_row("[bold]peak[/]", f"[bold]{_gib(off.peak)}[/]", f"[bold]{_gib(on.peak)}[/]")
    console.print(table)
    fits = Table(title=f"fits (peak + {estimate.RUNTIME_OVERHEAD_BYTES / estimate.GIB:.0f} GiB runtime overhead)")
    fits.add_column("GPU")
    fits.add_column("no checkpointing", justify="center")
    fits.add_column("gradient checkpointing", justify="center")
    fits.add_column("auto", justify="center")  # layers gradient_checkpointing: auto checkpoints there
    for gpu, verdict in result.fits().items():
        plan = result.auto_plan(estimate.GPUS[gpu] * (1 << 20))
        fits.add_row(gpu, _yes(verdict["without"]), _yes(verdict["with"]), _layers(plan))
    console.print(fits)
    console.print(_configured_line(result))


def _configured_line(result: EstimateResult) -> str:
    """What the config itself asks for; ``auto`` is planned for ``memory_budget_gib`` when one is set."""
    s = result.config_summary
    choice = s["gradient_checkpointing"]
    if choice == "auto":
        plan = result.auto_plan()
        if plan is None:
            return (
                "this config has gradient checkpointing auto: the layers are chosen for the GPU memory free at "
                "start (see the last column; set memory_budget_gib to plan for a budget)"
            )
        return (
            f"this config has gradient checkpointing auto with a {s['memory_budget_gib']:g} GiB budget: "
            f"{_layers(plan)} layers checkpointed, needs ~{_gib(result.configured.peak)} GiB"
        )
    configured = "on" if choice else "off"
    return f"this config has gradient checkpointing {configured}: needs ~{_gib(result.configured.peak)} GiB"


def _layers(plan: CheckpointPlan | None) -> str:
    if plan is None:
        return "-"
    text = f"{plan.checkpointed_layers}/{plan.total_layers}"
    if plan.offload:
        text += " + offload"
    return text if plan.fits else f"[red]{text}, no fit[/]"


def _gib(value: int) -> str:
    return f"{value / (1 << 30):.2f}"


def _yes(value: bool) -> str:
    return "[green]yes[/]" if value else "[red]no[/]"
