"""Data errors that say where: file, line and field."""

from __future__ import annotations

from tuneloop.data.types import RowRef


class DataError(ValueError):
    """A row (or file) that cannot be used. ``str(error)`` reads ``file:line: field: problem``."""

    def __init__(self, where: RowRef | str, problem: str, field: str | None = None) -> None:
        self.where = where
        self.field = field
        self.problem = problem
        prefix = f"{where}: " + (f"field {field!r}: " if field else "")
        super().__init__(prefix + problem)
