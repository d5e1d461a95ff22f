"""Read raw rows from JSONL and CSV/TSV files, each tagged with its file and line.

Only syntax is checked here (is it JSON, is it a mapping, is it text); what the row means is the job of
:mod:`tuneloop.data.shapes`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.data.errors import DataError
from tuneloop.data.types import RowRef

JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
DELIMITED_SUFFIXES = {".csv": ",", ".tsv": "\t"}


@dataclass(frozen=True)
class RawRow:
    ref: RowRef
    data: dict[str, Any]


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield every row of a JSONL, CSV or TSV file; raise :class:`DataError` at the first unreadable one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "file not found")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(path)
    elif suffix in DELIMITED_SUFFIXES:
        yield from _read_delimited(path, DELIMITED_SUFFIXES[suffix])
    else:
        known = ", ".join(sorted(JSONL_SUFFIXES | set(DELIMITED_SUFFIXES)))
        raise DataError(str(path), f"unsupported file type {suffix or '(none)'!r}; use one of {known}")


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if b"\x00" in raw:
                raise DataError(RowRef(str(path), number), "binary data (NUL byte): is this really a text file?")
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    RowRef(str(path), number), f"not UTF-8 text ({exc.reason} at byte {exc.start} of the line)"
                ) from None


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        ref = RowRef(str(path), number)
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(ref, f"not valid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(data, dict):
            raise DataError(ref, f"each line must be a JSON object, got {type(data).__name__}")
        yield RawRow(ref, data)


def _read_delimited(path: Path, delimiter: str) -> Iterator[RawRow]:
    text = "".join(line for _, line in _text_lines(path))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(str(path), "empty file: no header row")
    start = reader.line_num + 1
    for record in reader:
        ref = RowRef(str(path), start)
        start = reader.line_num + 1
        if None in record:
            raise DataError(ref, f"more fields than the header's {len(reader.fieldnames)}")
        if any(value is None for value in record.values()):
            raise DataError(ref, f"fewer fields than the header's {len(reader.fieldnames)}")
        if not any(value.strip() for value in record.values()):
            continue
        yield RawRow(ref, dict(record))
