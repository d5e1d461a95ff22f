"""Task registry: the json and generation task types beside classification, and the spec they store."""

from __future__ import annotations

import json

import pytest

from tuneloop.data import Conversation, Message, RowRef
from tuneloop.tasks import INVALID, TASKS, TaskSpec, get_task, parse_label

pytestmark = pytest.mark.unit


def conversation(answer: str, line: int = 1, text: str = "ticket") -> Conversation:
    return Conversation((Message("user", text), Message("assistant", answer)), RowRef("train.jsonl", line), label=answer)


def test_registry_has_the_three_task_types_with_headlines():
    assert set(TASKS) == {"classification", "json", "generation"}
    assert get_task("classification").headline == ("accuracy", "macro_f1")
    assert get_task("json").headline[:2] == ("valid_json_rate", "schema_compliance_rate")
    assert get_task("generation").headline == ("exact_match", "rouge1", "rougeL")
    with pytest.raises(KeyError, match="unknown task 'regression'; known: classification, generation, json"):
        get_task("regression")


def test_json_spec_reads_the_answer_keys_in_first_seen_order():
    train = [conversation('{"queue":"billing","priority":"high"}'), conversation('{"queue":"x","product":"api"}', 2)]
    spec = get_task("json").make_spec(train, None, None)
    assert spec.fields == ("queue", "priority", "product")
    assert "queue, priority, product" in spec.system_prompt
    assert get_task("json").make_spec(train, None, "Own prompt.").system_prompt == "Own prompt."


@pytest.mark.parametrize(("answer", "kind"), [("billing", "not valid JSON"), ('["a"]', "a JSON list, not an object")])
def test_json_spec_names_the_row_with_a_non_object_answer(answer, kind):
    train = [conversation('{"queue":"billing"}'), conversation(answer, 7)]
    with pytest.raises(ValueError, match=f"train.jsonl:7: task json needs a JSON object as the answer, got {kind}"):
        get_task("json").make_spec(train, None, None)


def test_json_answers_must_be_exactly_one_json_value():
    task, spec = get_task("json"), TaskSpec("json", None, fields=("queue",))
    assert task.parse_answer(' {"queue": "billing"}\n', spec) == '{"queue":"billing"}'
    assert task.parse_answer('```json\n{"queue": "billing"}\n```', spec) == INVALID
    assert task.parse_answer('Sure! {"queue": "billing"}', spec) == INVALID
    assert task.parse_answer('{"queue": "bill', spec) == INVALID


def test_json_reference_must_parse():
    task, spec = get_task("json"), TaskSpec("json", None, fields=("queue",))
    assert task.reference_of(conversation('{"queue": "a"}'), spec) == '{"queue":"a"}'
    with pytest.raises(ValueError, match="train.jsonl:3: the expected answer is not valid JSON"):
        task.reference_of(conversation("{oops", 3), spec)


def test_format_bleed_detectors():
    classification = TaskSpec("classification", None, ("billing", "bug_report"))
    looks = get_task("classification").looks_like_output
    assert looks("Billing.", classification) and looks("bug report", classification)
    assert not looks("Paris is the capital of France.", classification)
    json_spec = TaskSpec("json", None, fields=("queue", "priority"))
    bleed = get_task("json").looks_like_output
    assert bleed('{"answer": 4}', json_spec)
    assert bleed('{"queue":"billing","prio', json_spec)  # cut off, but clearly the task's format
    assert not bleed("The capital of France is Paris.", json_spec)
    assert get_task("generation").looks_like_output is None


def test_generation_spec_and_parse():
    task = get_task("generation")
    spec = task.make_spec([conversation("a summary")], None, "Summarise.")
    assert spec == TaskSpec("generation", "Summarise.")
    assert task.parse_answer("  two lines\nof text \n", spec) == "two lines\nof text"


def test_spec_round_trip_and_old_records_still_load():
    spec = TaskSpec("json", "p", (), ("queue",), {"type": "object"})
    assert TaskSpec.from_dict(json.loads(json.dumps(spec.as_dict()))) == spec
    assert TaskSpec.from_dict(json.loads(json.dumps(spec.as_dict()))).json_schema == {"type": "object"}
    old = {"task": "classification", "system_prompt": "s", "labels": ["a", "b"]}
    assert TaskSpec.from_dict(old) == TaskSpec("classification", "s", ("a", "b"))
    assert TaskSpec("classification", "s", ("a", "b")).as_dict() == old


def test_classification_parse_label_unchanged():
    spec = TaskSpec("classification", None, ("billing", "bug_report"))
    assert parse_label("BUG-REPORT", spec) == "bug_report"
    assert parse_label("maybe bug_report, maybe billing?", spec) == INVALID
