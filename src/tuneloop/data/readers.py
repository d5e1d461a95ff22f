"""Read raw rows from JSONL, CSV/TSV, parquet files and Hugging Face ``datasets`` folders, each tagged with
its file and line (row number for parquet and datasets folders).

Only syntax is checked here (is it JSON, is it a mapping, is it text); what the row means is the job of
:mod:`tuneloop.data.shapes`.

Two entry points share one implementation: :func:`read_rows` stops at the first bad row (training must not
start on a half-read file), :func:`scan_rows` hands bad rows back as :class:`DataError` values and carries on
(an audit must count every bad row, not just the first). Problems with the file as a whole (missing,
binary, UTF-16, unknown type) raise in both.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.data.errors import DataError
from tuneloop.data.types import RowRef

JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
DELIMITED_SUFFIXES = {".csv": ",", ".tsv": "\t"}
PARQUET_SUFFIXES = {".parquet"}
# A longer line is refused rather than read: one runaway line (a minified dump, a missing newline) must not
# take the machine's memory. 8 MiB is far above any sensible chat example.
MAX_LINE_BYTES = 8 * 1024 * 1024
_SNIFF_BYTES = 8192
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


@dataclass(frozen=True)
class RawRow:
    ref: RowRef
    data: dict[str, Any]


RowOrError = RawRow | DataError
Reader = Callable[[Path, int], Iterator[RowOrError]]


def read_rows(path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RawRow]:
    """Yield every row of a data file; raise :class:`DataError` at the first unreadable one."""
    for item in scan_rows(path, max_line_bytes=max_line_bytes):
        if isinstance(item, DataError):
            raise item
        yield item


def scan_rows(path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RowOrError]:
    """Yield every row, and a :class:`DataError` in place of each unreadable row; file-level problems raise."""
    path = Path(path)
    if path.is_dir():
        yield from _read_datasets_dir(path)
        return
    if not path.is_file():
        raise DataError(str(path), "file not found")
    suffix = path.suffix.lower()
    reader = READERS.get(suffix)
    if reader is None:
        known = ", ".join(sorted(READERS)) + ", or a Hugging Face datasets folder"
        raise DataError(str(path), f"unsupported file type {suffix or '(none)'!r}; use one of {known}")
    yield from reader(path, max_line_bytes)


def _check_text_file(path: Path) -> None:
    """Refuse binary and UTF-16 files up front: reading them line by line gives only confusing row errors."""
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if head.startswith(_UTF16_BOMS):
        raise DataError(str(path), "file is UTF-16 encoded; save it as UTF-8")
    if b"\x00" in head:
        line = head.count(b"\n", 0, head.index(b"\x00")) + 1
        raise DataError(RowRef(str(path), line), "binary data (NUL byte): is this really a text file?")


def _text_lines(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str | DataError]]:
    """``(line number, text)`` per line, or a :class:`DataError` for a line that is binary, not UTF-8 or too long."""
    _check_text_file(path)
    with path.open("rb") as handle:
        number = 0
        while True:
            raw = handle.readline(max_line_bytes + 1)
            if not raw:
                return
            number += 1
            ref = RowRef(str(path), number)
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                size = len(raw) + _skip_rest_of_line(handle)
                yield (
                    number,
                    DataError(
                        ref,
                        f"line is {size:,} bytes, over the {max_line_bytes:,}-byte limit; is a newline missing?",
                    ),
                )
                continue
            if number == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM) :]
            if b"\x00" in raw:
                yield number, DataError(ref, "binary data (NUL byte): is this really a text file?")
                continue
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    number,
                    DataError(
                        ref,
                        f"not UTF-8 text ({exc.reason} at byte {exc.start} of the line); save the file as UTF-8",
                    ),
                )


def _skip_rest_of_line(handle: io.BufferedReader) -> int:
    skipped = 0
    while True:
        chunk = handle.readline(1 << 20)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def _read_jsonl(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RowOrError]:
    for number, line in _text_lines(path, max_line_bytes):
        if isinstance(line, DataError):
            yield line
            continue
        if not line.strip():
            continue
        ref = RowRef(str(path), number)
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            yield DataError(ref, f"not valid JSON: {exc.msg} at column {exc.colno}")
            continue
        except RecursionError:
            yield DataError(ref, "not usable JSON: nested too deeply")
            continue
        if not isinstance(data, dict):
            yield DataError(ref, f"each line must be a JSON object, got {type(data).__name__}")
            continue
        yield RawRow(ref, data)


def _read_delimited(path: Path, delimiter: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RowOrError]:
    """CSV/TSV rows; a bad physical line is reported and left out, the rest still parse.

    ``csv`` needs the whole text (quoted fields may span lines), so line numbers are mapped back from the
    lines actually kept.
    """
    kept: list[str] = []
    numbers: list[int] = []
    for number, line in _text_lines(path, max_line_bytes):
        if isinstance(line, DataError):
            yield line
            continue
        kept.append(line)
        numbers.append(number)

    def physical(logical: int) -> int:
        return numbers[logical - 1] if 0 < logical <= len(numbers) else logical

    reader = csv.DictReader(io.StringIO("".join(kept), newline=""), delimiter=delimiter)
    try:
        fieldnames = reader.fieldnames
    except csv.Error as exc:
        raise DataError(RowRef(str(path), 1), f"header is not valid CSV: {exc}") from None
    if not fieldnames:
        raise DataError(str(path), "empty file: no header row")
    start = reader.line_num + 1
    while True:
        ref = RowRef(str(path), physical(start))
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield DataError(ref, f"not valid CSV: {exc}")
            start = reader.line_num + 1
            continue
        start = reader.line_num + 1
        if None in record:
            yield DataError(ref, f"more fields than the header's {len(fieldnames)}")
            continue
        if any(value is None for value in record.values()):
            yield DataError(ref, f"fewer fields than the header's {len(fieldnames)}")
            continue
        if not any(value.strip() for value in record.values()):
            continue
        yield RawRow(ref, dict(record))


def _read_parquet(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RowOrError]:
    """Rows of a parquet file; ``line`` is the 1-based row number. Class-label ints become their names."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a file that is not parquet
        raise DataError(str(path), f"not a readable parquet file: {exc}") from None
    names = _class_label_names(parquet.schema_arrow.metadata)
    number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            number += 1
            yield RawRow(RowRef(str(path), number), _decode_labels(record, names))


def _read_datasets_dir(path: Path) -> Iterator[RowOrError]:
    """A folder written by ``Dataset.save_to_disk``; a ``DatasetDict`` folder asks for one split."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise DataError(
            str(path),
            f"holds several splits ({', '.join(splits)}); pass one of them, e.g. {path / splits[0]}"
            if splits
            else "holds a DatasetDict with no splits",
        )
    if not (path / "state.json").is_file():
        raise DataError(str(path), "is a folder but not a Hugging Face datasets folder (no state.json)")
    from datasets import ClassLabel, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:  # datasets wraps arrow/json/fs errors in many types
        raise DataError(str(path), f"cannot load the datasets folder: {exc}") from None
    names = {
        key: feature.names for key, feature in dataset.features.items() if isinstance(feature, ClassLabel)
    }
    for number, record in enumerate(dataset.with_format(None), start=1):
        yield RawRow(RowRef(str(path), number), _decode_labels(dict(record), names))


def _class_label_names(metadata: dict[bytes, bytes] | None) -> dict[str, list[str]]:
    """ClassLabel names from the ``huggingface`` schema metadata that ``datasets`` writes into parquet."""
    if not metadata or b"huggingface" not in metadata:
        return {}
    try:
        features = json.loads(metadata[b"huggingface"]).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return {}
    return {
        key: feature["names"]
        for key, feature in features.items()
        if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and "names" in feature
    }


def _decode_labels(record: dict[str, Any], names: dict[str, list[str]]) -> dict[str, Any]:
    for key, labels in names.items():
        value = record.get(key)
        if isinstance(value, int) and 0 <= value < len(labels):
            record[key] = labels[value]
    return record


READERS: dict[str, Reader] = {
    **{suffix: _read_jsonl for suffix in JSONL_SUFFIXES},
    **{
        suffix: (lambda p, m, d=delimiter: _read_delimited(p, d, m))
        for suffix, delimiter in DELIMITED_SUFFIXES.items()
    },
    **{suffix: _read_parquet for suffix in PARQUET_SUFFIXES},
}
