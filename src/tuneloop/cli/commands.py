"""What each subcommand does: load the config, call the stage, print the result as tables."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import typer
from rich.console import Console
from rich.table import Table

from tuneloop.config import ConfigError, RunConfig, load_config, parse_override

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError, RuntimeError, KeyError)
# Exit and Abort subclass RuntimeError, yet they are the CLI's own exit paths, not user errors: ``typer.Exit(3)``
# raised by a command must leave with status 3, not be printed as "error: 3". Newer typer has its own classes,
# older typer re-exports click's; both are listed.
CLI_EXITS: tuple[type[BaseException], ...] = (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort)


def guarded(console: Console, action: Callable[[], None]) -> None:
    """Run ``action``; a user error prints one clear message and exits 1, never a traceback.

    ``typer.Exit``/``typer.Abort`` raised inside ``action`` pass through untouched, so a command can choose
    its own exit status (``tuneloop eval`` exits 3 when the gate fails).
    """
    try:
        action()
    except CLI_EXITS:
        raise
    except EXPECTED_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
        raise typer.Exit(1) from None


def _config(path: Path, overrides: list[str]) -> RunConfig:
    return load_config(path, dict(parse_override(o) for o in overrides))


def train(console: Console, path: Path, overrides: list[str], resume: bool, overwrite: bool) -> None:
    from tuneloop import train as train_stage
    from tuneloop.cli.progress import RichTrainObserver

    config = _config(path, overrides)
    console.print(f"training [bold]{config.base_model}[/] with {config.adapter} -> {config.output_dir}")
    result = train_stage.run(config, resume=resume, overwrite=overwrite, observer=RichTrainObserver(console))
    console.print(_train_table(result))


def evaluate(console: Console, path: Path, overrides: list[str]) -> None:
    """Evaluate and print (``cli/eval.py``); exits 3 when the config's gate fails."""
    from tuneloop.cli import eval as eval_cli

    eval_cli.evaluate(console, _config(path, overrides))


def predict(console: Console, run_dir: Path, text: str) -> None:
    from tuneloop.serve.predict import Predictor

    prediction = Predictor(run_dir).predict(text)
    console.print(prediction.answer, highlight=False, markup=False)
    if prediction.raw != prediction.answer:
        console.print(f"(raw answer: {prediction.raw!r})", style="dim", highlight=False, markup=False)


def chat(console: Console, run_dir: Path) -> None:
    from tuneloop.data import Message
    from tuneloop.serve.predict import Predictor

    predictor = Predictor(run_dir)
    history: list[Message] = []
    console.print("chat with the fine-tune; an empty line or Ctrl-D ends it", style="dim")
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: console.input("[bold]you> [/]"), ""):
        text = line.strip()
        if not text:
            break
        history.append(Message("user", text))
        answer = predictor.reply(history)
        history.append(Message("assistant", answer))
        console.print(f"[bold]model>[/] {answer}", highlight=False)


def demo(console: Console, output_dir: Path | None) -> None:
    from tuneloop.cli.progress import RichEvalProgress, RichTrainObserver
    from tuneloop.demo import demo_config, run_demo

    config = demo_config(output_dir)
    console.print(
        f"demo: LoRA fine-tune of [bold]{config.base_model}[/] on the bundled support-ticket example "
        f"-> {config.output_dir}"
    )
    with RichEvalProgress(console) as progress:
        result = run_demo(config.output_dir, observer=RichTrainObserver(console), progress=progress)
    console.print(_metrics_table(result.eval.metrics, title="support-triage test split"))
    console.print(_train_table(result.train))


def _train_table(result: Any) -> Table:
    table = Table(title="training", show_header=False)
    table.add_row("steps / epochs", f"{result.steps} / {result.epochs}")
    table.add_row("final train loss", _fmt(result.final_loss))
    table.add_row("validation loss", _fmt(result.val_loss))
    table.add_row("training time", f"{result.train_seconds:.0f} s ({result.tokens_per_second:.0f} tokens/s)")
    table.add_row("saved", f"{result.artifact_dir} ({result.artifact_bytes / 1e6:.1f} MB on disk)")
    return table


SYSTEM_NAMES = {"base": "base model, zero-shot", "few_shot": "base model, few-shot", "finetuned": "fine-tuned"}


def _metrics_table(metrics: dict[str, dict[str, Any]], title: str = "evaluation") -> Table:
    from tuneloop.cli.eval import metrics_table

    return metrics_table(metrics, title=title)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
