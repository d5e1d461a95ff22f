"""The ``tuneloop`` command: parse arguments, call a stage's ``run``, print its result. Nothing else."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tuneloop.cli import commands
from tuneloop.cli.data import data_app
from tuneloop.cli.environment import default_cuda_allocator
from tuneloop.cli.estimate import estimate_command
from tuneloop.cli.export import export_command
from tuneloop.cli.serve import serve_command

app = typer.Typer(
    name="tuneloop",
    help="Fine-tune small open LLMs to learn a behaviour: data -> train -> evaluate -> export -> serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
app.add_typer(data_app, name="data")
app.command("estimate")(estimate_command)
app.command("export")(export_command)
app.command("serve")(serve_command)

ConfigArg = Annotated[Path, typer.Argument(help="Run config (YAML).", exists=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key: --set epochs=2")]


@app.callback()
def _quiet_libraries() -> None:
    """Keep third-party chatter (download bars, deprecation notes) out of the command's own output; set the
    CUDA allocator's default before anything imports torch (:func:`default_cuda_allocator`)."""
    default_cuda_allocator(os.environ)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


@app.command()
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a run already in output_dir.")] = False,
) -> None:
    """Fine-tune the base model on the config's training data."""
    commands.guarded(console, lambda: commands.train(console, config, set_ or [], resume, overwrite))


@app.command("eval")
def evaluate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Evaluate the run in output_dir on test_file against the base and few-shot baselines."""
    commands.guarded(console, lambda: commands.evaluate(console, config, set_ or []))


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (or its adapter/ folder).")],
    text: Annotated[str, typer.Argument(help="The input to answer.")],
) -> None:
    """Answer one input with a trained run."""
    commands.guarded(console, lambda: commands.predict(console, run_dir, text))


@app.command()
def chat(run_dir: Annotated[Path, typer.Argument(help="A run directory (or its adapter/ folder).")]) -> None:
    """Talk to a trained run in the terminal (empty line or Ctrl-D to quit)."""
    commands.guarded(console, lambda: commands.chat(console, run_dir))


@app.command()
def demo(
    output_dir: Annotated[Path | None, typer.Option(help="Where the demo run goes (default: runs/demo-<time>).")] = None,
) -> None:
    """Fine-tune the embedded SmolLM2-135M on the bundled support-ticket example and compare with baselines."""
    commands.guarded(console, lambda: commands.demo(console, output_dir))


if __name__ == "__main__":
    app()
