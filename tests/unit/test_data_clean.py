"""Clean: a new file plus a change log; the input is never touched and the log never repeats personal data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tuneloop.data import DataError
from tuneloop.data.audit import audit
from tuneloop.data.clean import CleanOptions, clean, load_label_map
from tuneloop.data.scan import scan_file

pytestmark = pytest.mark.unit

PLANTED = Path(__file__).parents[1] / "fixtures" / "data" / "planted"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_clean_fixes_the_planted_defects_and_logs_each_change(tmp_path):
    source = PLANTED / "train.jsonl"
    before = sha(source)
    options = CleanOptions(label_map={"Billing": "billing", "bug-report": "bug_report"})
    result = clean(scan_file(source), tmp_path / "clean.jsonl", options)
    assert sha(source) == before
    assert result.actions == {
        "drop_malformed": 8,
        "relabel": 2,
        "scrub_pii": 13,
        "drop_conflict": 4,
        "drop_duplicate": 3,
        "drop_near_duplicate": 2,
    }
    assert (result.rows_in, result.rows_out) == (76, 76 - 8 - 4 - 3 - 2)
    log = read_jsonl(result.log)
    assert len(log) == sum(result.actions.values())
    assert {"action": "relabel", "row": f"{source}:56", "from": "Billing", "to": "billing"} in log
    text = result.log.read_text(encoding="utf-8") + result.output.read_text(encoding="utf-8")
    for secret in ("maria.lopez@example.com", "4111 1111 1111 1111", "AKIAIOSFODNN7EXAMPLE", "203.0.113.42"):
        assert secret not in text
    after = audit(scan_file(result.output))
    assert {f.check for f in after.findings} <= {"label_imbalance", "rare_labels"}  # what cleaning cannot fix


def test_scrubbed_rows_keep_their_shape_and_get_placeholders(tmp_path):
    result = clean(scan_file(PLANTED / "train.jsonl"), tmp_path / "out.jsonl")
    contents = [row["messages"][-2]["content"] for row in read_jsonl(result.output)]
    assert "Please send the invoice to <EMAIL> instead of me." in contents
    assert "Header sent: Authorization: Bearer <SECRET>" in contents
    assert "Refund to IBAN <IBAN> please." in contents


def test_conflict_policies(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(
        "text,label\nhello there,a\nhello there,a\nHello there!,b\nother text,c\nother text,d\n",
        encoding="utf-8",
    )
    majority = clean(scan_file(path), tmp_path / "m.csv", CleanOptions(conflicts="majority"))
    assert (tmp_path / "m.csv").read_text(encoding="utf-8").splitlines() == ["text,label", "hello there,a"]
    assert majority.actions == {"drop_conflict": 3, "drop_duplicate": 1}
    kept = clean(scan_file(path), tmp_path / "k.csv", CleanOptions(conflicts="keep", dedupe="none"))
    assert kept.rows_out == 5 and kept.actions == {}


def test_input_is_never_overwritten_and_outputs_only_with_permission(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\nhello,a\n", encoding="utf-8")
    with pytest.raises(DataError, match="is the input file"):
        clean(scan_file(path), path, overwrite=True)
    clean(scan_file(path), tmp_path / "out.csv")
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        clean(scan_file(path), tmp_path / "out.csv")
    assert clean(scan_file(path), tmp_path / "out.csv", overwrite=True).rows_out == 1


def test_csv_output_keeps_the_input_columns(tmp_path):
    result = clean(scan_file(PLANTED / "tickets.csv", infer_columns=True), tmp_path / "tickets.csv")
    lines = result.output.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "text,category" and len(lines) == 1 + 3


def test_label_map_errors_name_the_file_and_key(tmp_path):
    good = tmp_path / "map.yaml"
    good.write_text("Billing: billing\n7: seven\n", encoding="utf-8")
    assert load_label_map(good) == {"Billing": "billing", "7": "seven"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("Billing: ''\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.yaml: field 'Billing': must map to a non-empty label"):
        load_label_map(bad)
    with pytest.raises(DataError, match="label mapping file not found"):
        load_label_map(tmp_path / "missing.yaml")
