"""``tuneloop export``: parse arguments, run the export stage, print what was written and how it checked."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tuneloop.cli import commands

console = Console()


def export_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (or its adapter/ folder).")],
    format: Annotated[str, typer.Option("--format", "-f", help="adapter | merged | gguf")] = "adapter",
    quant: Annotated[
        str | None, typer.Option("--quant", "-q", help="GGUF type: f16 | q8_0 | q4_k_m (default f16).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: RUN_DIR/export).")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Merged weights: fp16 | bf16.")] = "fp16",
    evaluate: Annotated[
        bool, typer.Option("--eval", help="Score the exported artefact on the whole test split.")
    ] = False,
    check_prompts: Annotated[
        int, typer.Option("--check-prompts", help="Held-out prompts in the round-trip check.")
    ] = 20,
    min_agreement: Annotated[
        float | None,
        typer.Option(
            "--min-agreement", help="Required share of identical greedy answers (default per format)."
        ),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="Device for the round-trip check: cpu | cuda.")
    ] = "cpu",
    llama_cpp: Annotated[
        bool,
        typer.Option("--llama-cpp/--no-llama-cpp", help="Also check GGUFs with llama.cpp when installed."),
    ] = True,
) -> None:
    """Export a trained run (adapter, merged 16-bit, or GGUF), then check it answers like the trained model."""
    commands.guarded(
        console,
        lambda: _export(
            run_dir, format, quant, out, dtype, evaluate, check_prompts, min_agreement, device, llama_cpp
        ),
    )


def _export(
    run_dir: Path,
    format: str,
    quant: str | None,
    out: Path | None,
    dtype: str,
    evaluate: bool,
    check_prompts: int,
    min_agreement: float | None,
    device: str,
    llama_cpp: bool,
) -> None:
    from pydantic import ValidationError

    from tuneloop.export import ExportOptions, run

    try:
        options = ExportOptions(
            run_dir=run_dir,
            format=format,
            quant=quant,
            out=out,
            dtype=dtype,
            evaluate=evaluate,
            check_prompts=check_prompts,
            min_agreement=min_agreement,
            device=device,
            llama_cpp=llama_cpp,
        )
    except ValidationError as exc:
        raise ValueError(
            "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            )
        ) from None
    with console.status(f"exporting {run_dir} as {format}{' ' + quant if quant else ''} ..."):
        result = run(options)
    output = result.output
    table = Table(title=f"export {output.key}", show_header=False)
    for path in output.paths:
        table.add_row("wrote", str(path))
    for check in output.roundtrips:
        verdict = "[green]pass[/]" if check.passed else "[red]FAIL[/]"
        table.add_row(
            f"round trip ({check.loader})", f"{check.identical}/{check.n} identical greedy answers {verdict}"
        )
    if output.evaluation:
        evaluations = output.evaluation if "artefact" not in output.evaluation else {"": output.evaluation}
        for loader, ev in evaluations.items():
            acc, base = ev["exported"].get("accuracy"), ev["training_time"].get("accuracy")
            if acc is not None and base is not None:
                table.add_row(
                    f"test accuracy {loader}".strip(),
                    f"{acc:.3f} (training-time {base:.3f}, delta {acc - base:+.3f}, n={ev['n']})",
                )
    if output.vllm_command:
        table.add_row("vllm", output.vllm_command)
    table.add_row("record", str(result.record_path))
    console.print(table)
    for warning in output.warnings:
        console.print(f"[yellow]note:[/] {warning}", highlight=False)
