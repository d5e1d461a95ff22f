"""Rich progress for training and evaluation: the CLI's listener for the stages' callbacks."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class RichTrainObserver:
    """Progress bar over optimizer steps with the latest loss, learning rate and throughput."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = _progress(console)
        self.task_id: Any = None

    def on_fast_path(self, report: Any) -> None:
        """Before the first step: the kernels and checkpointed layers this run uses, and why."""
        self.console.print(f"fast path: {report.summary()}")
        for reason in report.reasons:
            self.console.print(f"  [dim]{reason}[/]")

    def on_train_start(self, total_steps: int, done_steps: int) -> None:
        self.progress.start()
        self.task_id = self.progress.add_task("train", total=total_steps, completed=done_steps, info="")

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        info = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  {metrics['tokens_per_s']:.0f} tok/s"
        self.progress.update(self.task_id, completed=step, info=info)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.progress.update(self.task_id, completed=metrics["step"])
        if metrics.get("val_loss") is not None:
            self.console.print(f"epoch {epoch}: validation loss {metrics['val_loss']:.4f}")

    def on_train_end(self) -> None:
        self.progress.stop()


class RichEvalProgress:
    """One bar per evaluated system (fine-tuned, base, few-shot)."""

    def __init__(self, console: Console) -> None:
        self.progress = _progress(console)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> RichEvalProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, system: str, done: int, total: int) -> None:
        if system not in self.tasks:
            self.tasks[system] = self.progress.add_task(f"eval {system}", total=total, info="")
        self.progress.update(self.tasks[system], completed=done)
