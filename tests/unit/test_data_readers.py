"""Readers and shape detection: bad files fail with one clear line, bad rows are counted, formats round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.data import DataError, load_conversations
from tuneloop.data.preference import PreferencePair
from tuneloop.data.readers import read_rows, scan_rows
from tuneloop.data.scan import scan_file
from tuneloop.data.shapes import ShapeOptions

pytestmark = pytest.mark.unit

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "billing"}]}


def lines(path: Path, *rows: bytes) -> Path:
    path.write_bytes(b"".join(row + b"\n" for row in rows))
    return path


def good() -> bytes:
    return json.dumps(ROW).encode()


def test_binary_file_is_refused_as_a_whole(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(DataError, match=r"data\.jsonl:3: binary data \(NUL byte\)"):
        scan_file(path)


def test_utf16_file_says_so(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes("text,label\nhello,billing\n".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16 encoded; save it as UTF-8"):
        list(read_rows(path))


def test_wrong_encoding_line_names_its_line(tmp_path):
    path = lines(tmp_path / "data.jsonl", good(), '{"text": "café"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"data\.jsonl:2: not UTF-8 text"):
        list(read_rows(path))


def test_truncated_json_line_names_its_line_and_column(tmp_path):
    path = lines(tmp_path / "data.jsonl", good(), good()[:20])
    with pytest.raises(DataError, match=r"data\.jsonl:2: not valid JSON: .* at column \d+"):
        load_conversations(path)


def test_overlong_line_is_refused_without_reading_it_whole(tmp_path):
    path = lines(tmp_path / "data.jsonl", good(), b'{"text": "' + b"x" * 5000 + b'"}', good())
    with pytest.raises(DataError, match=r"data\.jsonl:2: line is 5,013 bytes, over the 1,024-byte limit"):
        list(read_rows(path, max_line_bytes=1024))
    items = list(scan_rows(path, max_line_bytes=1024))
    assert [type(i).__name__ for i in items] == ["RawRow", "DataError", "RawRow"]
    assert items[2].ref.line == 3  # the line after the long one keeps its number


def test_scan_counts_every_bad_row_and_keeps_the_good_ones(tmp_path):
    path = lines(tmp_path / "data.jsonl", good(), b"{bad", b"[1]", good(), b'{"messages": []}')
    scan = scan_file(path)
    assert len(scan.examples) == 2 and scan.total_rows == 5
    assert [p.where.line for p in scan.problems] == [2, 3, 5]
    with pytest.raises(DataError, match=r"data\.jsonl:2: .*and 2 more bad rows"):
        scan.require_clean()


def test_csv_field_over_the_csv_module_limit_is_a_row_error(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "x" * 200_000 + ",billing\nshort,billing\n", encoding="utf-8")
    scan = scan_file(path)
    assert len(scan.examples) == 1
    assert "field larger than field limit" in scan.problems[0].problem


def test_utf8_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes("text,label\nhello,billing\n".encode("utf-8-sig"))
    assert load_conversations(path)[0].label == "billing"


def test_column_names_are_guessed_only_when_asked_and_unambiguous(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("sentence,intent\nhello,greet\n", encoding="utf-8")
    assert scan_file(path, infer_columns=True).examples[0].label == "greet"
    assert scan_file(path).problems, "training-style reads use the configured columns only"
    ambiguous = tmp_path / "two.csv"
    ambiguous.write_text("sentence,query,category\na,b,c\n", encoding="utf-8")
    with pytest.raises(DataError, match="choose with --text-column and --label-column"):
        scan_file(ambiguous, infer_columns=True)


def test_explicit_columns_map_any_names(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("body\ttopic\nhello there\tgreet\n", encoding="utf-8")
    scan = scan_file(path, ShapeOptions(text_column="body", label_column="topic"))
    assert scan.examples[0].messages[0].content == "hello there"


def test_ambiguous_shape_asks_for_shape_and_shape_can_be_forced(tmp_path):
    row = {"instruction": "say hi", "output": "hi", "text": "x", "label": "y"}
    path = lines(tmp_path / "data.jsonl", json.dumps(row).encode())
    with pytest.raises(
        DataError, match=r"fit several shapes \(alpaca, labelled_text\); choose one with --shape"
    ):
        scan_file(path)
    assert scan_file(path, shape="alpaca").examples[0].answer == "hi"


def test_preference_pairs_in_both_forms(tmp_path):
    rows = [
        {"prompt": "q1", "chosen": "good", "rejected": "bad"},
        {
            "prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q2"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
    ]
    path = lines(tmp_path / "prefs.jsonl", *(json.dumps(r).encode() for r in rows))
    pairs = scan_file(path).examples
    assert all(isinstance(p, PreferencePair) for p in pairs)
    assert pairs[1].prompt[0].role == "system" and pairs[1].rejected == "bad"
    with pytest.raises(DataError, match="need a preference method such as dpo"):
        load_conversations(path)  # SFT loading still refuses preference data


def test_parquet_with_class_label_names(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["billing", "bug"])})
    Dataset.from_dict({"text": ["refund", "crash"], "label": [0, 1]}, features=features).to_parquet(
        tmp_path / "d.parquet"
    )
    scan = scan_file(tmp_path / "d.parquet")
    assert [(e.messages[0].content, e.label) for e in scan.examples] == [
        ("refund", "billing"),
        ("crash", "bug"),
    ]
    assert str(scan.examples[1].source) == f"{tmp_path / 'd.parquet'}:2"


def test_datasets_folder_and_dataset_dict_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    data = Dataset.from_dict({"instruction": ["say hi"], "input": [""], "output": ["hi"]})
    data.save_to_disk(tmp_path / "one")
    assert scan_file(tmp_path / "one").examples[0].answer == "hi"
    DatasetDict({"train": data, "test": data}).save_to_disk(tmp_path / "many")
    with pytest.raises(
        DataError, match=r"holds several splits \(train, test\); pass one of them, e\.g\. .*many/train"
    ):
        scan_file(tmp_path / "many")
    assert scan_file(tmp_path / "many" / "train").shape == "alpaca"
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a Hugging Face datasets folder"):
        scan_file(tmp_path / "plain")
