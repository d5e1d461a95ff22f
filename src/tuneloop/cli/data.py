"""``tuneloop data``: audit, clean, split and preview training data. Parses arguments and prints; the work
lives in :mod:`tuneloop.data`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tuneloop.cli import commands
from tuneloop.data.errors import DataError
from tuneloop.data.findings import AuditReport
from tuneloop.data.near_duplicates import DEFAULT_THRESHOLD
from tuneloop.data.shapes import ShapeOptions

data_app = typer.Typer(
    name="data",
    help="Audit, clean, split and preview training data before it trains.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

DataArg = Annotated[
    Path | None,
    typer.Argument(
        help="Data file (JSONL, CSV/TSV, parquet) or datasets folder. Default: the config's train_file."
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Run config: columns, tokenizer, max_seq_len.")
]
TextColumnOpt = Annotated[
    str | None, typer.Option("--text-column", help="Column holding the input text (tabular files).")
]
LabelColumnOpt = Annotated[
    str | None, typer.Option("--label-column", help="Column holding the label (tabular files).")
]
ShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--shape",
        help="Row shape, when auto-detection is ambiguous: messages, sharegpt, alpaca, labelled_text, preference.",
    ),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        "--near-threshold",
        min=0.0,
        max=1.0,
        help=f"Jaccard similarity from which two inputs are near-copies (default {DEFAULT_THRESHOLD}).",
    ),
]


def _guarded(action: Callable[[], Any]) -> Any:
    """Like the main commands: a user error is one red line and exit status 1, never a traceback."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(action())
        except (OSError, UnicodeError) as exc:
            raise DataError(getattr(exc, "filename", None) or "input", exc.strerror or str(exc)) from None

    commands.guarded(console, run)
    return result[0] if result else None


def _load_config(config: Path | None) -> Any:
    if config is None:
        return None
    from tuneloop.config import load_config

    return load_config(config)


def _scan_settings(
    config: Any, text_column: str | None, label_column: str | None, shape: str | None
) -> dict[str, Any]:
    """Columns from the flags, else the config, else guessed from the file (said in the report)."""
    base = ShapeOptions(config.text_column, config.label_column) if config is not None else ShapeOptions()
    options = ShapeOptions(text_column or base.text_column, label_column or base.label_column)
    guess = config is None and text_column is None and label_column is None
    return {"options": options, "shape": shape, "infer_columns": guess}


def _data_path(data: Path | None, config: Any) -> Path:
    if data is not None:
        return data
    if config is None:
        raise DataError("DATA", "give a data file, or --config to audit its train_file")
    return Path(config.train_file)


# --- audit ----------------------------------------------------------------------------------------------------


@data_app.command("audit")
def audit_command(
    data: DataArg = None,
    test: Annotated[
        list[Path] | None,
        typer.Option("--test", "-t", help="Held-out file checked for leakage from DATA (repeatable)."),
    ] = None,
    config: ConfigOpt = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the report as JSON to this file ('-' for stdout)."),
    ] = None,
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = None,
    shape: ShapeOpt = None,
    near_threshold: ThresholdOpt = None,
) -> None:
    """Find and count data problems; exit status 1 when a blocking one (malformed rows, leakage) is found.

    With --config the config's validation_file and test_file are checked too, and token lengths and the
    chat template are checked with the model's tokenizer.
    """
    report = _guarded(
        lambda: _run_audit(data, test or [], config, text_column, label_column, shape, near_threshold)
    )
    if json_out is not None:
        text = json.dumps(report.as_dict(), indent=2, ensure_ascii=False)
        if str(json_out) == "-":
            print(text)
        else:
            _guarded(lambda: json_out.write_text(text + "\n", encoding="utf-8"))
    if str(json_out) != "-":
        _print_report(report)
    if report.blocking:
        raise typer.Exit(1)


def _run_audit(
    data: Path | None,
    tests: list[Path],
    config_path: Path | None,
    text_column: str | None,
    label_column: str | None,
    shape: str | None,
    near_threshold: float | None,
) -> AuditReport:
    from tuneloop.data.audit import AuditOptions, audit
    from tuneloop.data.scan import scan_file

    config = _load_config(config_path)
    settings = _scan_settings(config, text_column, label_column, shape)
    train_path = _data_path(data, config)
    others = {_role(path, tests): path for path in tests}
    if config is not None:
        for role, path in (("validation", config.validation_file), ("test", config.test_file)):
            known = {p.resolve() for p in others.values()} | {train_path.resolve()}
            if path is not None and Path(path).resolve() not in known and role not in others:
                others[role] = Path(path)
    train = scan_file(train_path, **settings)
    # held-out files use the training file's columns, so `text,category` is guessed once, not per file
    held_out = {
        role: scan_file(path, **{**settings, "options": train.options}) for role, path in others.items()
    }
    tokens = None
    if config is not None:
        from tuneloop.data.token_checks import token_settings_from_config

        tokens = token_settings_from_config(config, train.conversations())
    options = AuditOptions(near_threshold=near_threshold) if near_threshold is not None else AuditOptions()
    classification = config.task == "classification" if config is not None else None
    return audit(train, held_out, options=options, tokens=tokens, classification=classification)


def _short_names(report: AuditReport) -> Callable[[str], str]:
    """File names alone when they are distinct (they usually are: train.csv, test.csv), else full paths."""
    paths = [stat.path for stat in report.files]
    names = {path: Path(path).name for path in paths}
    if len(set(names.values())) < len(paths):
        return lambda text: text
    replacements = sorted(names.items(), key=lambda kv: -len(kv[0]))

    def shorten(text: str) -> str:
        for path, name in replacements:
            text = text.replace(path + ":", name + ":")
        return text

    return shorten


def _role(path: Path, tests: list[Path]) -> str:
    """``test`` for a single held-out file; with several, each one's name (``validation``, ``test``...)."""
    if len(tests) == 1:
        return "test"
    stems = [p.stem for p in tests]
    return path.stem if stems.count(path.stem) == 1 else str(path)


def _print_report(report: AuditReport) -> None:
    short = _short_names(report)
    files = Table(title="data audit")
    for column in (
        "file",
        "role",
        "shape",
        "usable/rows",
        "labels",
        "answer chars p50/max",
        "tokens p50/p99/max",
    ):
        files.add_column(
            column, justify="left" if column in {"file", "role", "shape"} else "right", overflow="fold"
        )
    for stat in report.files:
        chars = f"{stat.answer_chars.p50}/{stat.answer_chars.max}" if stat.answer_chars else "-"
        tokens = (
            f"{stat.token_lengths.p50}/{stat.token_lengths.p99}/{stat.token_lengths.max}"
            if stat.token_lengths
            else "-"
        )
        labels = str(len(stat.labels)) if stat.labels is not None else "-"
        files.add_row(
            short(stat.path + ":")[:-1],
            stat.role,
            stat.shape or "?",
            f"{stat.usable}/{stat.rows}",
            labels,
            chars,
            tokens,
        )
    console.print(files)
    for stat in report.files:
        for note in stat.notes:
            console.print(
                f"{short(stat.path + ':')[:-1]}: {note}", style="dim", highlight=False, markup=False
            )
    train = report.files[0]
    if train.labels:
        _print_labels(train.labels)
    if not report.findings:
        console.print(f"[bold green]no problems found[/] ({report.seconds:.1f} s)")
        return
    console.print(Text("findings", style="bold underline"))
    for finding in report.findings:
        line = Text()
        line.append(
            "BLOCK " if finding.blocking else "warn  ", style="bold red" if finding.blocking else "yellow"
        )
        line.append(finding.check + (f" ({finding.kind})" if finding.kind else ""), style="bold")
        line.append(f" · {short(finding.file + ':')[:-1]} · {finding.count} {finding.unit}\n", style="cyan")
        line.append("      " + short(finding.message))
        console.print(line)
        for example in finding.examples[:3]:
            console.print(
                Text(f"        {short(example.ref)}  {short(example.detail)}".rstrip(), style="dim")
            )
    blocking = report.blocking
    if blocking:
        console.print(
            f"[bold red]{len(blocking)} blocking problem(s)[/]: fix them before training ({report.seconds:.1f} s)"
        )
    else:
        console.print(
            f"[bold green]no blocking problems[/], {len(report.findings)} warning(s) ({report.seconds:.1f} s)"
        )


def _print_labels(labels: dict[str, int]) -> None:
    ordered = sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ordered if len(ordered) <= 12 else ordered[:6] + [("…", 0)] + ordered[-5:]
    table = Table(title=f"training labels ({len(labels)})")
    table.add_column("label")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    total = sum(labels.values())
    for label, count in shown:
        shown_label = label if len(label) <= 48 else label[:47] + "…"
        table.add_row(shown_label, str(count) if count else "", f"{count / total:.1%}" if count else "")
    console.print(table)


# --- clean ----------------------------------------------------------------------------------------------------


@data_app.command("clean")
def clean_command(
    data: Annotated[Path, typer.Argument(help="Data file to clean (never modified).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Cleaned file to write (format from its suffix).")],
    labels: Annotated[
        Path | None, typer.Option("--labels", help="YAML/JSON mapping of old label to new label.")
    ] = None,
    dedupe: Annotated[str, typer.Option(help="Drop duplicates: near, exact or none.")] = "near",
    conflicts: Annotated[
        str, typer.Option(help="Same input, different answers: drop (all), majority or keep.")
    ] = "drop",
    scrub_pii: Annotated[
        bool, typer.Option("--scrub-pii/--keep-pii", help="Replace personal data by <EMAIL>, <PHONE>...")
    ] = True,
    log: Annotated[
        Path | None, typer.Option(help="Change log (JSON lines). Default: OUT's name + .changes.jsonl.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUT (never the input).")
    ] = False,
    config: ConfigOpt = None,
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = None,
    shape: ShapeOpt = None,
    near_threshold: ThresholdOpt = None,
) -> None:
    """Write a cleaned copy: dedupe, drop conflicts, map labels, scrub personal data; log every change."""

    def run() -> Any:
        from tuneloop.data.clean import CleanOptions, clean, load_label_map
        from tuneloop.data.scan import scan_file

        for name, value, allowed in (
            ("--dedupe", dedupe, ("near", "exact", "none")),
            ("--conflicts", conflicts, ("drop", "majority", "keep")),
        ):
            if value not in allowed:
                raise DataError(name, f"must be one of {', '.join(allowed)}, got {value!r}")
        options = CleanOptions(
            dedupe=dedupe,
            conflicts=conflicts,
            scrub_pii=scrub_pii,  # type: ignore[arg-type]
            label_map=load_label_map(labels) if labels else {},
            **({"near_threshold": near_threshold} if near_threshold is not None else {}),
        )
        scan = scan_file(data, **_scan_settings(_load_config(config), text_column, label_column, shape))
        return clean(scan, out, options, log=log, overwrite=overwrite)

    result = _guarded(run)
    table = Table(title="data clean", show_header=False)
    table.add_row("rows in / out", f"{result.rows_in} / {result.rows_out}")
    for action, count in sorted(result.actions.items()):
        table.add_row(action.replace("_", " "), str(count))
    table.add_row("written", str(result.output))
    table.add_row("change log", str(result.log))
    console.print(table)


# --- split ----------------------------------------------------------------------------------------------------


@data_app.command("split")
def split_command(
    data: Annotated[Path, typer.Argument(help="Data file to split.")],
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Folder for train/validation/test files.")],
    ratios: Annotated[str, typer.Option(help="train,validation,test fractions.")] = "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="Seed of the shuffle: same seed, same split.")] = 42,
    stratify: Annotated[
        bool | None,
        typer.Option(
            "--stratify/--no-stratify", help="Keep label proportions (default: when labels repeat)."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing split files.")] = False,
    config: ConfigOpt = None,
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = None,
    shape: ShapeOpt = None,
    near_threshold: ThresholdOpt = None,
) -> None:
    """Stratified, seeded train/validation/test split; near-duplicate groups never straddle two splits."""

    def run() -> Any:
        from tuneloop.data.scan import scan_file
        from tuneloop.data.split import SplitOptions, split

        try:
            fractions = tuple(float(part) for part in ratios.split(","))
        except ValueError:
            raise DataError("--ratios", f"expected three numbers like 0.8,0.1,0.1, got {ratios!r}") from None
        options = SplitOptions(
            ratios=fractions,
            seed=seed,
            stratify=stratify,  # type: ignore[arg-type]
            **({"near_threshold": near_threshold} if near_threshold is not None else {}),
        )
        scan = scan_file(data, **_scan_settings(_load_config(config), text_column, label_column, shape))
        return split(scan, out_dir, options, overwrite=overwrite)

    result = _guarded(run)
    table = Table(title="data split")
    for column in ("split", "rows", "labels", "file"):
        table.add_column(column, justify="right" if column in {"rows", "labels"} else "left")
    for name, path in result.outputs.items():
        table.add_row(name, str(result.rows[name]), str(len(result.labels[name])), str(path))
    console.print(table)
    console.print(
        f"{result.groups} near-duplicate groups ({result.grouped_rows} rows) kept within one split",
        style="dim",
    )


# --- preview --------------------------------------------------------------------------------------------------


@data_app.command("preview")
def preview_command(
    data: DataArg = None,
    config: Annotated[
        Path,
        typer.Option("--config", "-c", help="Run config: the model whose chat template renders the rows."),
    ] = ...,  # type: ignore[assignment]
    n: Annotated[int, typer.Option("-n", min=1, help="Rows to show.")] = 3,
    start: Annotated[int, typer.Option(min=0, help="Skip this many usable rows first.")] = 0,
    shape: ShapeOpt = None,
) -> None:
    """Show rows exactly as the model sees them; trained (unmasked) tokens are highlighted."""

    def run() -> Any:
        from tuneloop.data import ChatRenderer
        from tuneloop.data.scan import scan_file
        from tuneloop.data.token_checks import token_settings_from_config

        cfg = _load_config(config)
        scan = scan_file(_data_path(data, cfg), **_scan_settings(cfg, None, None, shape))
        settings = token_settings_from_config(cfg, scan.conversations())
        renderer = ChatRenderer(settings.tokenizer)
        chosen = scan.conversations()[start : start + n]
        return (
            cfg,
            renderer,
            [(c, renderer.encode(c.with_system_prompt(settings.system_prompt))) for c in chosen],
            scan,
        )

    cfg, renderer, rows, scan = _guarded(run)
    markers = (
        not console.is_terminal or console.no_color
    )  # no colours in a pipe or log: bracket the trained runs
    legend = f"trained tokens are between {MARKERS[0]} and {MARKERS[1]}" if markers else "trained tokens"
    console.print(
        Text.assemble(("legend: ", "bold"), ("prompt (no loss)", "dim"), "  ", (legend, TRAINED_STYLE))
    )
    for conversation, example in rows:
        trained = example.num_trained_tokens
        over = len(example.input_ids) > cfg.max_seq_len
        header = f"── {conversation.source} · {len(example.input_ids)} tokens, {trained} trained"
        console.print(
            Text(
                header + (f" · OVER max_seq_len={cfg.max_seq_len}" if over else ""),
                style="bold red" if over else "bold",
            )
        )
        console.print(
            highlight_trained(renderer.tokenizer, example.input_ids, example.labels, markers=markers),
            soft_wrap=True,
        )
    if scan.problems:
        console.print(
            f"{len(scan.problems)} unusable rows skipped; `tuneloop data audit` lists them", style="yellow"
        )


TRAINED_STYLE = "bold black on green3"
MARKERS = ("⟦", "⟧")


def highlight_trained(
    tokenizer: Any, input_ids: tuple[int, ...], labels: tuple[int, ...], *, markers: bool = False
) -> Text:
    """The decoded token stream, each run of trained tokens in :data:`TRAINED_STYLE` (and between
    :data:`MARKERS` when asked, for output without colour) and the rest dim."""
    from tuneloop.data.render import IGNORE_INDEX

    text = Text()
    run: list[int] = []
    trained = False
    for token, label in zip((*input_ids, None), (*labels, None)):
        is_trained = label is not None and label != IGNORE_INDEX
        if token is None or (run and is_trained != trained):
            decoded = tokenizer.decode(run)
            if trained and markers:
                decoded = MARKERS[0] + decoded + MARKERS[1]
            text.append(decoded, style=TRAINED_STYLE if trained else "dim")
            run = []
        if token is not None:
            run.append(token)
            trained = is_trained
    return text
