"""Write raw rows back to disk in the user's own format (JSONL, CSV/TSV, parquet), atomically.

``clean`` and ``split`` hand back files shaped like the ones they read, so nothing downstream (a config's
``text_column``, a notebook, a diff against the original) has to change. A file is written to a temporary
name beside its target and renamed into place: an interrupted run never leaves a half-written dataset.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tuneloop.data.errors import DataError

Rows = Sequence[dict[str, Any]]


def _write_jsonl(path: Path, rows: Rows, fieldnames: Sequence[str]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def _write_delimited(delimiter: str) -> Callable[[Path, Rows, Sequence[str]], None]:
    def write(path: Path, rows: Rows, fieldnames: Sequence[str]) -> None:
        for row in rows:
            nested = [key for key, value in row.items() if isinstance(value, (dict, list))]
            if nested:
                raise DataError(
                    str(path), f"rows have nested fields ({', '.join(nested)}); write them as .jsonl instead"
                )
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(
                handle, fieldnames=list(fieldnames), delimiter=delimiter, extrasaction="ignore"
            )
            writer.writeheader()
            writer.writerows(rows)

    return write


def _write_parquet(path: Path, rows: Rows, fieldnames: Sequence[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(rows)), path)


WRITERS: dict[str, Callable[[Path, Rows, Sequence[str]], None]] = {
    ".jsonl": _write_jsonl,
    ".ndjson": _write_jsonl,
    ".csv": _write_delimited(","),
    ".tsv": _write_delimited("\t"),
    ".parquet": _write_parquet,
}


def output_suffix(source: str | Path) -> str:
    """The suffix to write rows read from ``source`` with: its own, or ``.jsonl`` for folders and ``.json``."""
    suffix = Path(source).suffix.lower()
    return suffix if suffix in WRITERS else ".jsonl"


def write_rows(path: str | Path, rows: Rows, fieldnames: Sequence[str] | None = None) -> Path:
    """Write ``rows`` to ``path`` in the format its suffix names; columns default to the first row's keys."""
    path = Path(path)
    writer = WRITERS.get(path.suffix.lower())
    if writer is None:
        raise DataError(
            str(path),
            f"cannot write {path.suffix or 'files without a suffix'!r}; use one of {', '.join(WRITERS)}",
        )
    columns = list(fieldnames) if fieldnames is not None else _columns(rows)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise DataError(str(path), f"cannot write here: {exc.strerror or exc}") from None
    os.close(handle)
    try:
        writer(Path(temporary), rows, columns)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def _columns(rows: Rows) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def refuse_to_overwrite(output: Path, inputs: Sequence[str | Path], overwrite: bool) -> None:
    """An input is never written to; an existing output only with ``overwrite``."""
    for source in inputs:
        source = Path(source)
        if output.resolve() == source.resolve() or (
            output.exists() and source.exists() and output.samefile(source)
        ):
            raise DataError(
                str(output), "is the input file; write the result to a new file (the input is never modified)"
            )
    if output.exists() and not overwrite:
        raise DataError(str(output), "already exists; pass --overwrite to replace it")
