"""The shipped regression prompt set loads and its rule checks judge answers as a reader would."""

from __future__ import annotations

import pytest

from tuneloop.data import DataError
from tuneloop.evaluate.regression import CHECKS, load_prompts, passes, score_system, statistics
from tuneloop.tasks import TaskSpec, get_task

pytestmark = pytest.mark.unit


def by_id():
    return {p.id: p for p in load_prompts()}


def test_shipped_set_is_varied_and_valid():
    prompts = load_prompts()
    assert len(prompts) >= 40
    assert len({p.id for p in prompts}) == len(prompts)
    assert {p.category for p in prompts} >= {"knowledge", "arithmetic", "language", "instruction", "reasoning"}
    assert {p.check["type"] for p in prompts} == set(CHECKS)


@pytest.mark.parametrize(
    ("prompt_id", "answer", "ok"),
    [
        ("capital-france", "The capital of France is Paris.", True),
        ("capital-france", "billing", False),
        ("add-small", "2 + 3 = 5", True),
        ("add-small", "2 + 3 = 6", False),
        ("hundred-half", "Half of 100 is 50.", True),
        ("freezing-point", "Water freezes at 0 degrees Celsius.", True),
        ("freezing-point", "It freezes at 100 degrees.", False),
        ("say-yes", "Yes", True),
        ("say-yes", "No.", False),
        ("list-colors", "Red, blue and green.", True),
        ("list-colors", "Red.", False),
        ("count-three", "1, 2, 3", True),
        ("week-days", "A week has seven days.", True),
        ("year-months", "A year is 365 days, so 365 * 12 = 312 months.", False),  # first new number: 365
        ("multiply-small", "3 times 4 is 12", True),
        ("add-tens", "10 + 20 = 20", False),  # echoes the question's numbers, answers none
        ("reasoning-taller", "Ann.", True),
        ("reasoning-taller", "Tom is shorter than Ann.", False),
    ],
)
def test_checks(prompt_id, answer, ok):
    assert passes(by_id()[prompt_id], answer) is ok


def test_scoring_counts_passes_and_format_bleed():
    prompts = [by_id()["capital-france"], by_id()["add-small"], by_id()["sky-color"]]
    spec = TaskSpec("classification", None, ("billing", "bug_report"))
    scored = score_system(prompts, ["Paris.", "billing", "Bug report"], get_task("classification"), spec)
    assert scored["passed"] == 1 and scored["pass_rate"] == pytest.approx(1 / 3)
    assert scored["format_bleed"] == 2 and scored["format_bleed_rate"] == pytest.approx(2 / 3)
    assert scored["per_category"] == {"arithmetic": {"passed": 0, "n": 1}, "knowledge": {"passed": 1, "n": 2}}
    assert set(statistics(scored, has_bleed=True)) == {"pass_rate", "format_bleed_rate"}
    generation = score_system(prompts, ["Paris", "5", "blue"], get_task("generation"), TaskSpec("generation", None))
    assert generation["pass_rate"] == 1.0 and generation["format_bleed_rate"] is None


def test_own_prompt_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "a", "prompt": "2+2?", "check": {"type": "number", "value": 4}}\n{"id": "b", "prompt": "x", "check": {"type": "vibes"}}\n')
    with pytest.raises(DataError, match="mine.jsonl:2: field 'check': check.type must be one of"):
        load_prompts(path)
    path.write_text('{"id": "a", "prompt": "2+2?", "check": {"type": "regex"}}\n')
    with pytest.raises(DataError, match="mine.jsonl:1: field 'check': a regex check needs pattern"):
        load_prompts(path)
    path.write_text('{"id": "a", "prompt": "2+2?", "check": {"type": "number", "value": 4}}\n')
    assert [p.id for p in load_prompts(path)] == ["a"]
