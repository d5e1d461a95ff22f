"""What an audit reports: findings (each a count plus example rows) and per-file statistics.

Kept apart from the checks so the CLI, ``train`` and tests share one typed vocabulary, and so the JSON
report is a plain ``as_dict`` of these objects with no formatting logic of its own.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["blocking", "warning"]
Unit = Literal["rows", "groups", "labels"]


@dataclass(frozen=True)
class RowExample:
    """One row that shows a finding: its ``file:line`` and what is wrong with it."""

    ref: str
    detail: str = ""


@dataclass(frozen=True)
class Finding:
    """A problem found by one check in one file, counted, with a few example rows.

    ``count`` is in ``unit`` (rows affected unless said otherwise); ``groups`` counts clusters where a
    check works on groups of rows (duplicates, conflicts).
    """

    check: str
    severity: Severity
    file: str
    count: int
    message: str
    examples: tuple[RowExample, ...] = ()
    kind: str | None = None
    groups: int | None = None
    unit: Unit = "rows"

    @property
    def blocking(self) -> bool:
        return self.severity == "blocking"

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "check": self.check,
            "kind": self.kind,
            "severity": self.severity,
            "file": self.file,
            "count": self.count,
            "unit": self.unit,
            "message": self.message,
            "examples": [{"row": e.ref, "detail": e.detail} for e in self.examples],
        }
        if self.groups is not None:
            data["groups"] = self.groups
        return data


@dataclass(frozen=True)
class Distribution:
    """Summary of a list of lengths: enough to see the long tail without a histogram."""

    count: int
    min: int
    p50: int
    p90: int
    p99: int
    max: int
    mean: float

    @classmethod
    def of(cls, values: Sequence[int]) -> Distribution | None:
        if not values:
            return None
        ordered = sorted(values)

        def pick(q: float) -> int:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return cls(
            len(ordered),
            ordered[0],
            pick(0.5),
            pick(0.9),
            pick(0.99),
            ordered[-1],
            round(statistics.fmean(ordered), 1),
        )

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FileStats:
    """What was read from one file and the shape of its contents."""

    path: str
    role: str
    shape: str | None
    rows: int
    usable: int
    notes: list[str] = field(default_factory=list)
    labels: dict[str, int] | None = None
    answer_chars: Distribution | None = None
    token_lengths: Distribution | None = None
    answer_tokens: Distribution | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "role": self.role,
            "shape": self.shape,
            "rows": self.rows,
            "usable": self.usable,
            "notes": self.notes,
            "labels": self.labels,
            "answer_chars": self.answer_chars.as_dict() if self.answer_chars else None,
            "token_lengths": self.token_lengths.as_dict() if self.token_lengths else None,
            "answer_tokens": self.answer_tokens.as_dict() if self.answer_tokens else None,
        }


@dataclass
class AuditReport:
    files: list[FileStats]
    findings: list[Finding]
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.blocking]

    def count(self, check: str, file: str | None = None, kind: str | None = None) -> int:
        """Total ``count`` of the findings of one check (optionally one file / kind): what tests assert on."""
        return sum(
            f.count
            for f in self.findings
            if f.check == check and (file is None or f.file == file) and (kind is None or f.kind == kind)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.blocking,
            "blocking": len(self.blocking),
            "seconds": round(self.seconds, 2),
            "settings": self.settings,
            "files": [f.as_dict() for f in self.files],
            "findings": [f.as_dict() for f in self.findings],
        }
