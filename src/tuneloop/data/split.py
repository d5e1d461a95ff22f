"""Split one dataset into train/validation/test: stratified, seeded, and leakage-free by construction.

A random row split of real data leaks: near-copies of a row ("my card hasn't arrived" / "my card hasn't
arrived yet") land on both sides and the test score measures memory. So the unit of splitting is a
*group* of same-or-near-same inputs (the clusters :mod:`tuneloop.data.near_duplicates` finds), never a row.
Groups are stratified by their majority label, shuffled with the seed, and dealt largest first to the
split furthest below its target, which keeps every label's proportions close to the ratios.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuneloop.data.errors import DataError
from tuneloop.data.near_duplicates import DEFAULT_THRESHOLD, similarity_graph
from tuneloop.data.scan import Example, ScanResult, input_text, labels_repeat
from tuneloop.data.writers import output_suffix, refuse_to_overwrite, write_rows

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitOptions:
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 42
    near_threshold: float = DEFAULT_THRESHOLD
    stratify: bool | None = (
        None  # None: when labels repeat (5+ rows per label on average), i.e. classification
    )

    def __post_init__(self) -> None:
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios) or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise DataError(
                "--ratios", f"need three non-negative fractions that sum to 1, got {list(self.ratios)}"
            )
        if self.ratios[0] == 0:
            raise DataError("--ratios", "the train fraction must be above 0")


@dataclass(frozen=True)
class SplitResult:
    outputs: dict[str, Path]
    rows: dict[str, int]
    labels: dict[str, dict[str, int]]
    grouped_rows: int  # rows that share a near-duplicate group with another row (kept on one side)
    groups: int


def near_duplicate_groups(
    examples: Sequence[Example], threshold: float = DEFAULT_THRESHOLD
) -> list[list[int]]:
    """Indices of examples grouped by same-or-near-same input (singletons included), in file order."""
    graph = similarity_graph([input_text(e) for e in examples], threshold)
    groups: dict[int, list[int]] = defaultdict(list)
    for index, component in enumerate(graph.components()):
        groups[component].append(index)
    return list(groups.values())


def _stratify(examples: Sequence[Example], options: SplitOptions) -> bool:
    if options.stratify is not None:
        return options.stratify
    return labels_repeat(examples)


def assign_splits(
    examples: Sequence[Example], options: SplitOptions | None = None, groups: list[list[int]] | None = None
) -> list[int]:
    """The split index (0 train, 1 validation, 2 test) of each example; a pure function of data and seed."""
    options = options or SplitOptions()
    groups = groups if groups is not None else near_duplicate_groups(examples, options.near_threshold)
    stratify = _stratify(examples, options)
    strata: dict[str, list[list[int]]] = defaultdict(list)
    for members in groups:
        labels = Counter(
            examples[i].label for i in members if getattr(examples[i], "label", None) is not None
        )
        key = min(labels.items(), key=lambda kv: (-kv[1], kv[0]))[0] if labels and stratify else ""
        strata[key].append(list(members))
    rng = random.Random(options.seed)
    assignment = [0] * len(examples)
    open_splits = [s for s, ratio in enumerate(options.ratios) if ratio > 0]
    for key in sorted(strata):
        stratum = strata[key]
        rng.shuffle(stratum)
        stratum.sort(key=len, reverse=True)  # stable: equal sizes keep the seeded order
        total = sum(len(g) for g in stratum)
        targets = [ratio * total for ratio in options.ratios]
        filled = [0] * len(SPLITS)
        for members in stratum:
            chosen = max(open_splits, key=lambda s: (targets[s] - filled[s], -s))
            filled[chosen] += len(members)
            for index in members:
                assignment[index] = chosen
    return assignment


def split(
    scan: ScanResult,
    out_dir: str | Path,
    options: SplitOptions | None = None,
    *,
    suffix: str | None = None,
    overwrite: bool = False,
) -> SplitResult:
    """Write ``train``/``validation``/``test`` files of ``scan``'s rows into ``out_dir``.

    Refuses a file with unusable rows (``tuneloop data clean`` drops them) rather than silently losing them.
    """
    options = options or SplitOptions()
    scan.require_clean()
    out_dir = Path(out_dir)
    suffix = suffix or output_suffix(scan.path)
    outputs = {name: out_dir / f"{name}{suffix}" for name, ratio in zip(SPLITS, options.ratios) if ratio > 0}
    for path in outputs.values():
        refuse_to_overwrite(path, [scan.path], overwrite)
    groups = near_duplicate_groups(scan.examples, options.near_threshold)
    assignment = assign_splits(scan.examples, options, groups)
    fieldnames = list(scan.rows[0].data)
    rows: dict[str, int] = {}
    labels: dict[str, dict[str, int]] = {}
    for index, (name, path) in enumerate(zip(SPLITS, [outputs.get(n) for n in SPLITS])):
        if path is None:
            continue
        chosen = [i for i, s in enumerate(assignment) if s == index]
        write_rows(
            path, [scan.rows[i].data for i in chosen], fieldnames if suffix in {".csv", ".tsv"} else None
        )
        rows[name] = len(chosen)
        counts = Counter(
            scan.examples[i].label for i in chosen if getattr(scan.examples[i], "label", None) is not None
        )
        labels[name] = dict(sorted(counts.items()))
    multi = [len(g) for g in groups if len(g) > 1]
    return SplitResult(outputs, rows, labels, sum(multi), len(multi))
