"""Split: ratios and label proportions kept, same seed same split, near-duplicates never across splits."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from tuneloop.data import Conversation, DataError, Message, RowRef
from tuneloop.data.audit import audit
from tuneloop.data.scan import scan_file
from tuneloop.data.split import SplitOptions, assign_splits, near_duplicate_groups, split

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"


def convo(text: str, label: str, line: int) -> Conversation:
    return Conversation((Message("user", text), Message("assistant", label)), RowRef("d.csv", line), label)


def dataset() -> list[Conversation]:
    """200 rows, labels 60/30/10 %, with 20 near-duplicate pairs."""
    rng = random.Random(0)
    words = "refund card account crash export login invite team invoice page blank slow sync mobile".split()
    rows = []
    for index in range(200):
        label = "a" if index % 10 < 6 else "b" if index % 10 < 9 else "c"
        rows.append(convo(" ".join(rng.choice(words) for _ in range(12)), label, index + 2))
    for index in range(0, 200, 10):
        rows.append(convo(rows[index].messages[0].content + "!!", rows[index].label, 300 + index))
    return rows


def test_ratios_and_label_proportions_are_kept():
    rows = dataset()
    assignment = assign_splits(rows)
    sizes = Counter(assignment)
    assert abs(sizes[0] - 176) <= 3 and abs(sizes[1] - 22) <= 3 and abs(sizes[2] - 22) <= 3
    for split_index in (0, 1, 2):
        labels = Counter(r.label for r, s in zip(rows, assignment) if s == split_index)
        total = sum(labels.values())
        assert abs(labels["a"] / total - 0.6) < 0.06 and abs(labels["c"] / total - 0.1) < 0.06


def test_same_seed_same_split_other_seed_other_split():
    rows = dataset()
    assert assign_splits(rows, SplitOptions(seed=1)) == assign_splits(rows, SplitOptions(seed=1))
    assert assign_splits(rows, SplitOptions(seed=1)) != assign_splits(rows, SplitOptions(seed=2))


def test_near_duplicate_groups_never_straddle_splits():
    rows = dataset()
    groups = [g for g in near_duplicate_groups(rows) if len(g) > 1]
    assert len(groups) == 20
    for seed in range(5):
        assignment = assign_splits(rows, SplitOptions(seed=seed))
        assert all(len({assignment[i] for i in group}) == 1 for group in groups)


def test_split_writes_files_that_audit_as_leak_free(tmp_path):
    source = tmp_path / "data.csv"
    lines = ["text,label"] + [f'"{r.messages[0].content}",{r.label}' for r in dataset()]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = split(scan_file(source), tmp_path / "out")
    assert sum(result.rows.values()) == 220 and result.groups == 20
    assert set(result.labels["test"]) == {"a", "b", "c"}
    files = {name: scan_file(path) for name, path in result.outputs.items()}
    report = audit(
        files["train"], {"validation": files["validation"], "test": files["test"]}, checks=["leakage"]
    )
    assert report.findings == []
    with pytest.raises(DataError, match="already exists"):
        split(scan_file(source), tmp_path / "out")


def test_zero_fraction_writes_no_file_and_bad_ratios_are_refused(tmp_path):
    result = split(
        scan_file(FIXTURES / "clean" / "train.jsonl"), tmp_path, SplitOptions(ratios=(0.9, 0.1, 0.0))
    )
    assert set(result.outputs) == {"train", "validation"} and result.rows["validation"] == 4
    with pytest.raises(DataError, match="sum to 1"):
        SplitOptions(ratios=(0.5, 0.2, 0.2))


def test_split_refuses_a_file_with_unusable_rows(tmp_path):
    with pytest.raises(DataError, match=r"train\.jsonl:21: .*and 7 more bad rows"):
        split(scan_file(FIXTURES / "planted" / "train.jsonl"), tmp_path)
