"""Readers and row shapes: every usual layout becomes a conversation; bad rows name file, line and field."""

from __future__ import annotations

import pytest

from tests.conftest import write_jsonl
from tuneloop.data import DataError, ShapeOptions, load_conversations

pytestmark = pytest.mark.unit


def roles(conversation) -> list[str]:
    return [m.role for m in conversation.messages]


def test_messages_sharegpt_and_alpaca_rows(tmp_path):
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate", "input": "bonjour", "output": "hello"}])
    assert roles(load_conversations(messages)[0]) == ["user", "assistant"]
    assert roles(load_conversations(sharegpt)[0]) == ["system", "user", "assistant"]
    [row] = load_conversations(alpaca)
    assert row.messages[0].content == "Translate\n\nbonjour" and row.answer == "hello"


def test_csv_with_column_mapping(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('body,queue\n"multi\nline ticket",billing\nsecond,onboarding\n')
    rows = load_conversations(path, ShapeOptions(text_column="body", label_column="queue"))
    assert [r.label for r in rows] == ["billing", "onboarding"]
    assert rows[0].prompt[-1].content == "multi\nline ticket"
    assert str(rows[1].source).endswith("t.csv:4")


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "cut off", "lab\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_conversations(path)


def test_missing_field_names_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "", "label": "y"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'text': is empty"):
        load_conversations(path)


def test_wrong_role_order_and_unknown_role(tmp_path):
    order = write_jsonl(tmp_path / "o.jsonl", [{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}])
    with pytest.raises(DataError, match=r"o\.jsonl:1: field 'messages\[0\]': expected a user turn"):
        load_conversations(order)
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match="unknown role 'robot'"):
        load_conversations(unknown)


def test_ambiguous_and_unknown_shapes(tmp_path):
    both = write_jsonl(tmp_path / "b.jsonl", [{"messages": [], "conversations": []}])
    with pytest.raises(DataError, match="ambiguous row"):
        load_conversations(both)
    neither = write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"unrecognised row shape with keys \[answer, question\]"):
        load_conversations(neither)


def test_binary_and_non_utf8_files(tmp_path):
    binary = tmp_path / "x.jsonl"
    binary.write_bytes(b'{"text": "t", "label": "a"}\n\x00\x01\x02')
    with pytest.raises(DataError, match=r"x\.jsonl:2: binary data"):
        load_conversations(binary)
    latin = tmp_path / "l.csv"
    latin.write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"l\.csv:2: not UTF-8"):
        load_conversations(latin)
