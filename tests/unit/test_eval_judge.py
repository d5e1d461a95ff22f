"""Judge verdict parsing, pair combination and the on-disk cache key."""

from __future__ import annotations

import pytest

from tuneloop.evaluate.judge import JudgeCache, _combine, _consistent, judged_indices, parse_score, parse_winner

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ('{"score": 7, "reason": "ok"}', 7),
        ('Sure.\n```json\n{"score": "9", "reason": "good"}\n```', 9),
        ("Score: 4/10 because it rambles", 4),
        ('{"score": 11}', None),
        ("I cannot grade this.", None),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize(
    ("reply", "winner"),
    [('{"winner": "A", "reason": "x"}', "A"), ('{"winner": "b"}', "B"), ("Winner: tie", "tie"), ("both fine", None)],
)
def test_parse_winner(reply, winner):
    assert parse_winner(reply) == winner


def test_a_win_needs_both_orders():
    assert _combine("A", "B") == 1.0  # fine-tune first and preferred, then second and preferred
    assert _combine("B", "A") == 0.0
    assert _combine("A", "A") == 0.5  # the judge always picks the first position: no information
    assert _combine("tie", "B") == 0.5
    assert _consistent("A", "B") and _consistent("tie", "tie") and not _consistent("A", "A")


def test_cache_key_covers_every_input_and_round_trips(tmp_path):
    key = JudgeCache.key("judge-model", "rubric", "pointwise", "prompt", "ref", "answer")
    assert key != JudgeCache.key("judge-model", "rubric", "pointwise", "prompt", "ref", "answer!")
    assert key != JudgeCache.key("other-model", "rubric", "pointwise", "prompt", "ref", "answer")
    assert key != JudgeCache.key("judge-model", "rubric 2", "pointwise", "prompt", "ref", "answer")
    cache = JudgeCache(tmp_path)
    assert cache.get(key) is None
    cache.put(key, {"score": 5, "reply": "r"})
    assert cache.get(key) == {"score": 5, "reply": "r"}


def test_judged_sample_is_seeded_and_bounded():
    assert judged_indices(5, None, 0) == [0, 1, 2, 3, 4]
    sample = judged_indices(100, 10, 3)
    assert len(sample) == 10 and sample == sorted(sample) and sample == judged_indices(100, 10, 3)
