"""Read a whole data file into examples *and* the rows that could not be used, without stopping.

Training reads strictly (:func:`tuneloop.data.shapes.load_conversations` stops at the first bad row); the
data toolkit needs every problem at once, the raw rows back (to write a cleaned file in the input's own
format), and a shape that is detected across all known shapes, preference pairs included, with column
names guessed for tabular files when the user gave none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tuneloop.data.errors import DataError
from tuneloop.data.near_duplicates import exact_key
from tuneloop.data.preference import PREFERENCE_SHAPES, PreferencePair
from tuneloop.data.readers import MAX_LINE_BYTES, RawRow, scan_rows
from tuneloop.data.shapes import SHAPES, Shape, ShapeOptions
from tuneloop.data.types import Conversation

Example = Conversation | PreferencePair

ALL_SHAPES: dict[str, Shape] = {**SHAPES, **PREFERENCE_SHAPES}
# Column names seen in public classification sets, tried only when the configured names are absent.
TEXT_COLUMNS = ("text", "sentence", "utterance", "query", "question", "input", "message", "content")
LABEL_COLUMNS = ("label", "category", "intent", "class", "target", "labels")


@dataclass
class ScanResult:
    """Everything read from one file: usable examples (with their raw rows) and every unusable row."""

    path: str
    shape: str | None = None
    options: ShapeOptions = field(default_factory=ShapeOptions)
    examples: list[Example] = field(default_factory=list)
    rows: list[RawRow] = field(default_factory=list)
    problems: list[DataError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_rows(self) -> int:
        return len(self.examples) + len(self.problems)

    def conversations(self) -> list[Conversation]:
        """Examples as conversations (a preference pair becomes its chosen conversation)."""
        return [e.as_conversation() if isinstance(e, PreferencePair) else e for e in self.examples]

    def require_clean(self) -> None:
        """Raise the first row problem: for commands that must not silently skip rows."""
        if self.problems:
            more = (
                f" (and {len(self.problems) - 1} more bad rows; `tuneloop data audit` lists them)"
                if len(self.problems) > 1
                else ""
            )
            raise DataError(self.problems[0].where, self.problems[0].problem + more, self.problems[0].field)


def input_text(example: Example) -> str:
    """The input a model sees, without the system prompt: shared by most rows, it would make all look alike."""
    return "\n".join(m.content for m in example.prompt if m.role != "system")


def answer_key(example: Example) -> str:
    """What two rows must share to have "the same answer" (both answers, for a preference pair)."""
    if isinstance(example, PreferencePair):
        return exact_key(example.chosen) + "\x00" + exact_key(example.rejected)
    return exact_key(example.answer)


def labels_repeat(examples: Sequence[Example], per_label: int = 5) -> bool:
    """Whether answers look like class labels: on average ``per_label`` or more rows share each answer.

    Free-form answers are (nearly) all distinct, so label checks and stratification would be meaningless.
    """
    labels = {e.label for e in examples} - {None}
    return bool(labels) and len(labels) * per_label <= len(examples)


def scan_file(
    path: str | Path,
    options: ShapeOptions | None = None,
    *,
    shape: str | None = None,
    infer_columns: bool = False,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> ScanResult:
    """Read ``path`` into a :class:`ScanResult`; only problems with the file as a whole raise.

    ``shape`` forces a shape by name; otherwise the first readable row decides and every later row must
    fit it. ``infer_columns`` lets a tabular file whose configured columns are missing use a known column
    name pair (``text``/``category``...), said in ``notes``.
    """
    result = ScanResult(str(path), options=options or ShapeOptions())
    chosen = _named_shape(shape) if shape else None
    first_ref = None
    for item in scan_rows(path, max_line_bytes=max_line_bytes):
        if isinstance(item, DataError):
            result.problems.append(item)
            continue
        if chosen is None:
            try:
                chosen, result.options, note = _detect(item, result.options, infer_columns)
            except _FileLevel:
                raise
            except DataError as exc:
                result.problems.append(exc)
                continue
            first_ref = item.ref
            result.shape = chosen.name
            if note:
                result.notes.append(note)
        elif not chosen.matches(item.data, result.options):
            where = f" of {first_ref}" if first_ref else ""
            keys = ", ".join(sorted(item.data)) or "(none)"
            result.problems.append(
                DataError(item.ref, f"row does not have the {chosen.name} shape{where} (its keys: {keys})")
            )
            continue
        result.shape = chosen.name
        try:
            example = chosen.convert(item, result.options)
        except DataError as exc:
            result.problems.append(exc)
            continue
        result.examples.append(example)
        result.rows.append(item)
    if result.total_rows == 0:
        raise DataError(str(path), "no rows")
    return result


def _named_shape(name: str) -> Shape:
    if name not in ALL_SHAPES:
        raise DataError("--shape", f"unknown shape {name!r}; known: {', '.join(ALL_SHAPES)}")
    return ALL_SHAPES[name]


def _detect(
    row: RawRow, options: ShapeOptions, infer_columns: bool
) -> tuple[Shape, ShapeOptions, str | None]:
    """The one shape this row fits; ambiguity is a file-level error (every row would be ambiguous)."""
    found = [s for s in ALL_SHAPES.values() if s.matches(row.data, options)]
    keys = ", ".join(sorted(row.data)) or "(none)"
    if len(found) > 1:
        names = ", ".join(s.name for s in found)
        raise _FileLevel(
            row.ref, f"ambiguous rows: keys [{keys}] fit several shapes ({names}); choose one with --shape"
        )
    if found:
        return found[0], options, None
    if infer_columns:
        guessed = _guess_columns(row, options)
        if guessed is not None:
            note = f"columns auto-detected: text={guessed.text_column!r}, label={guessed.label_column!r}"
            return SHAPES["labelled_text"], guessed, note
    known = "; ".join(f"{s.name}: {s.description}" for s in ALL_SHAPES.values())
    raise DataError(row.ref, f"unrecognised row shape with keys [{keys}]. Known shapes: {known}")


def _guess_columns(row: RawRow, options: ShapeOptions) -> ShapeOptions | None:
    keys = set(row.data)
    texts = (
        [k for k in TEXT_COLUMNS if k in keys] if options.text_column not in keys else [options.text_column]
    )
    labels = (
        [k for k in LABEL_COLUMNS if k in keys]
        if options.label_column not in keys
        else [options.label_column]
    )
    if len(texts) == 1 and len(labels) == 1 and texts != labels:
        return replace(options, text_column=texts[0], label_column=labels[0])
    if texts and labels:
        raise _FileLevel(
            row.ref,
            f"cannot tell the text and label columns apart (text: {', '.join(texts)}; label: {', '.join(labels)}); "
            "choose with --text-column and --label-column",
        )
    return None


class _FileLevel(DataError):
    """A detection problem that holds for the whole file, so it stops the scan instead of being counted."""
