"""``commands.guarded``: user errors become one red line and exit 1; the CLI's own exits pass through untouched."""

from __future__ import annotations

import pytest
import typer
from rich.console import Console

from tuneloop.cli.commands import guarded
from tuneloop.config import ConfigError

pytestmark = pytest.mark.unit


def raising(exc: BaseException):
    def action() -> None:
        raise exc

    return action


@pytest.mark.parametrize("code", [0, 3])
def test_typer_exit_keeps_its_status_and_prints_nothing(code):
    console = Console(record=True, width=120)
    with pytest.raises(typer.Exit) as caught:
        guarded(console, raising(typer.Exit(code)))
    assert caught.value.exit_code == code
    assert console.export_text() == ""  # not "error: 3"


def test_abort_passes_through():
    console = Console(record=True, width=120)
    with pytest.raises(typer.Abort):
        guarded(console, raising(typer.Abort()))
    assert console.export_text() == ""


@pytest.mark.parametrize(
    "exc, shown",
    [(ConfigError("run.yaml: bad key"), "run.yaml: bad key"), (RuntimeError("no GPU"), "no GPU"), (KeyError("missing thing"), "missing thing")],
)
def test_user_error_is_one_line_and_exit_1(exc, shown):
    console = Console(record=True, width=120)
    with pytest.raises(typer.Exit) as caught:
        guarded(console, raising(exc))
    assert caught.value.exit_code == 1
    assert console.export_text().strip() == f"error: {shown}"
