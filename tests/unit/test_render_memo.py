"""Answers remembered per renderer: the same encodings as tokenizing every answer, each distinct answer once."""

from __future__ import annotations

import pytest

from tuneloop.data import ChatRenderer, Conversation, Message, RowRef, encode_dataset

pytestmark = pytest.mark.unit


class CountingTokenizer:
    """The tiny tokenizer, with the texts passed to ``encode`` and the batches passed to it recorded (composition,
    nothing patched)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.encoded: list[str] = []
        self.batches: list[list[str]] = []

    def __call__(self, texts, **kwargs):
        self.batches.append(list(texts))
        return self._tokenizer(texts, **kwargs)

    def encode(self, text, **kwargs):
        self.encoded.append(text)
        return self._tokenizer.encode(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def rows(n: int) -> list[Conversation]:
    labels = ["billing", "bug report", "onboarding"]
    return [
        Conversation(
            (Message("system", "Route the ticket."), Message("user", f"ticket number {i} please help"), Message("assistant", labels[i % 3])),
            RowRef("t.csv", i + 2),
        )
        for i in range(n)
    ]


def test_repeated_answers_are_tokenized_once_and_encode_the_same(tiny_tokenizer):
    conversations = rows(30)
    fresh = ChatRenderer(tiny_tokenizer)
    fresh.ANSWER_MEMO_SIZE = 0  # nothing remembered: every answer tokenized, as before the memo
    expected, expected_report = encode_dataset(fresh, conversations, 256, "error")

    counting = CountingTokenizer(tiny_tokenizer)
    examples, report = encode_dataset(ChatRenderer(counting), conversations, 256, "error")
    assert examples == expected and report.as_dict() == expected_report.as_dict()
    answers = [t for t in counting.encoded if t in {"billing", "bug report", "onboarding"}]
    assert sorted(answers) == ["billing", "bug report", "onboarding"]
    assert len(counting.batches) == 1 and len(counting.batches[0]) == 30  # every prompt part in one call
