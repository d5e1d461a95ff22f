"""Fix what an audit finds and can be fixed: a new file plus a log of every change, the input untouched.

Order matters and is fixed: unusable rows are dropped, labels are mapped, personal data is scrubbed, and
only then are duplicates and conflicts resolved, because mapping ``Billing`` to ``billing`` or replacing
two different e-mail addresses by ``<EMAIL>`` can make two rows the same.

The log (JSON lines) names each changed row by ``file:line`` and says what was done, never the personal data
that was removed: the log must be safe to keep next to the cleaned file.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tuneloop.data.errors import DataError
from tuneloop.data.near_duplicates import DEFAULT_THRESHOLD, exact_key, normalise, similarity_graph
from tuneloop.data.pii import scrub
from tuneloop.data.preference import PreferencePair
from tuneloop.data.readers import RawRow
from tuneloop.data.scan import ALL_SHAPES, Example, ScanResult, answer_key, input_text
from tuneloop.data.writers import refuse_to_overwrite, write_rows

Dedupe = Literal["none", "exact", "near"]
ConflictPolicy = Literal["keep", "drop", "majority"]


@dataclass(frozen=True)
class CleanOptions:
    dedupe: Dedupe = "near"
    conflicts: ConflictPolicy = "drop"
    scrub_pii: bool = True
    label_map: dict[str, str] = field(default_factory=dict)
    near_threshold: float = DEFAULT_THRESHOLD


@dataclass(frozen=True)
class Change:
    action: str
    row: str
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "row": self.row, **self.detail}


@dataclass(frozen=True)
class CleanResult:
    output: Path
    log: Path
    rows_in: int
    rows_out: int
    actions: dict[str, int]


def load_label_map(path: str | Path) -> dict[str, str]:
    """A YAML or JSON mapping ``old label: new label``; every key and value must be text."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(str(path), "label mapping file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(str(path), f"not valid YAML/JSON: {exc}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise DataError(str(path), "must be a mapping of old label to new label")
    mapping = {}
    for key, value in raw.items():
        if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
            raise DataError(str(path), f"must map to a non-empty label, got {value!r}", field=str(key))
        mapping[str(key)] = str(value)
    return mapping


# How to rewrite the label in a raw row of each shape (a registry, like the shapes themselves).
def _set_column(row: RawRow, scan: ScanResult, label: str) -> None:
    row.data[scan.options.label_column] = label


def _set_last(key: str, content_key: str) -> Callable[[RawRow, ScanResult, str], None]:
    def setter(row: RawRow, scan: ScanResult, label: str) -> None:
        row.data[key][-1][content_key] = label

    return setter


def _set_output(row: RawRow, scan: ScanResult, label: str) -> None:
    row.data["output"] = label


LABEL_SETTERS: dict[str, Callable[[RawRow, ScanResult, str], None]] = {
    "labelled_text": _set_column,
    "messages": _set_last("messages", "content"),
    "sharegpt": _set_last("conversations", "value"),
    "alpaca": _set_output,
}


def _scrub_value(value: Any, kinds: Counter[str]) -> Any:
    if isinstance(value, str):
        text, matches = scrub(value)
        kinds.update(m.kind for m in matches)
        return text
    if isinstance(value, list):
        return [_scrub_value(item, kinds) for item in value]
    if isinstance(value, dict):
        return {key: _scrub_value(item, kinds) for key, item in value.items()}
    return value


def clean(
    scan: ScanResult,
    output: str | Path,
    options: CleanOptions | None = None,
    *,
    log: str | Path | None = None,
    overwrite: bool = False,
) -> CleanResult:
    """Write the cleaned rows of ``scan`` to ``output`` (same columns, format from the suffix) and the log."""
    options = options or CleanOptions()
    output = Path(output)
    log = Path(log) if log else output.with_name(output.stem + ".changes.jsonl")
    refuse_to_overwrite(output, [scan.path], overwrite)
    refuse_to_overwrite(log, [scan.path, output], overwrite)
    changes = [
        Change("drop_malformed", str(p.where), {"reason": p.problem, "field": p.field}) for p in scan.problems
    ]
    shape = ALL_SHAPES[scan.shape] if scan.shape else None
    rows = [
        RawRow(row.ref, json.loads(json.dumps(row.data, default=str))) for row in scan.rows
    ]  # private copies
    examples = list(scan.examples)
    for index, (row, example) in enumerate(zip(rows, examples)):
        changed = False
        label = getattr(example, "label", None)
        if label is not None and label in options.label_map and options.label_map[label] != label and shape:
            LABEL_SETTERS[shape.name](row, scan, options.label_map[label])
            changes.append(Change("relabel", str(row.ref), {"from": label, "to": options.label_map[label]}))
            changed = True
        if options.scrub_pii:
            kinds: Counter[str] = Counter()
            data = _scrub_value(row.data, kinds)
            if kinds:
                row.data.clear()
                row.data.update(data)
                changes.append(Change("scrub_pii", str(row.ref), {"replaced": dict(kinds)}))
                changed = True
        if changed and shape:
            examples[index] = shape.convert(row, scan.options)
    dropped = _resolve_duplicates(examples, options, changes)
    kept = [row.data for index, row in enumerate(rows) if index not in dropped]
    fieldnames = list(scan.rows[0].data) if scan.rows else []
    write_rows(output, kept, fieldnames if output.suffix.lower() in {".csv", ".tsv"} else None)
    write_rows(log, [c.as_dict() for c in changes])
    return CleanResult(output, log, scan.total_rows, len(kept), dict(Counter(c.action for c in changes)))


def _resolve_duplicates(examples: list[Example], options: CleanOptions, changes: list[Change]) -> set[int]:
    """Indices to drop: conflicting clusters (per policy), then every copy but the first of each answer."""
    if options.dedupe == "none" and options.conflicts == "keep":
        return set()
    graph = similarity_graph([input_text(e) for e in examples], options.near_threshold)
    clusters: dict[int, list[int]] = defaultdict(list)
    for index, component in enumerate(graph.components()):
        clusters[component].append(index)
    dropped: set[int] = set()
    for members in clusters.values():
        if len(members) < 2:
            continue
        by_answer: dict[str, list[int]] = defaultdict(list)
        for index in members:
            key = answer_key(examples[index])
            by_answer[key if isinstance(examples[index], PreferencePair) else normalise(key)].append(index)
        if len(by_answer) > 1 and not isinstance(examples[members[0]], PreferencePair):
            members_left = _apply_conflict_policy(examples, by_answer, options.conflicts, changes, dropped)
            by_answer = {key: [i for i in group if i in members_left] for key, group in by_answer.items()}
        for group in by_answer.values():
            kept: dict[tuple[str, str], int] = {}
            for index in group:
                key = (exact_key(input_text(examples[index])), answer_key(examples[index]))
                if key in kept and options.dedupe != "none":
                    dropped.add(index)
                    changes.append(
                        Change(
                            "drop_duplicate",
                            str(examples[index].source),
                            {"same_as": str(examples[kept[key]].source)},
                        )
                    )
                elif kept and options.dedupe == "near":
                    first = next(iter(kept.values()))
                    dropped.add(index)
                    changes.append(
                        Change(
                            "drop_near_duplicate",
                            str(examples[index].source),
                            {"near_copy_of": str(examples[first].source)},
                        )
                    )
                else:
                    kept.setdefault(key, index)
    return dropped


def _apply_conflict_policy(
    examples: list[Example],
    by_answer: dict[str, list[int]],
    policy: ConflictPolicy,
    changes: list[Change],
    dropped: set[int],
) -> set[int]:
    """Drop the rows the policy rejects; return the cluster's rows that stay."""
    members = {i for group in by_answer.values() for i in group}
    if policy == "keep":
        return members
    sizes = sorted((len(group) for group in by_answer.values()), reverse=True)
    if policy == "majority" and sizes[0] > sum(sizes[1:]):
        winner = max(by_answer.values(), key=len)
        losers = members - set(winner)
    else:
        losers = members
    answers = sorted({examples[i].answer[:60] for i in members})
    for index in sorted(losers):
        dropped.add(index)
        changes.append(
            Change(
                "drop_conflict",
                str(examples[index].source),
                {"answer": examples[index].answer[:60], "answers_in_group": answers},
            )
        )
    return members - losers
