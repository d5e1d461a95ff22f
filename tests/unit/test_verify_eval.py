"""bench/verify_eval.py: agrees with tuneloop on honest run files, and catches a number that does not follow
from predictions.jsonl, for each task type."""

from __future__ import annotations

import json

import pytest

from tests.unit.synthetic_eval import load_verifier, write_run
from tuneloop.tasks import TaskSpec

pytestmark = pytest.mark.unit

LABELS = ("billing", "bug_report", "onboarding")


@pytest.fixture(scope="module")
def verifier():
    return load_verifier()


def run_verifier(verifier, capsys, run_dir, *extra) -> tuple[int, dict]:
    code = verifier.main([str(run_dir), *extra])
    return code, json.loads(capsys.readouterr().out)


def tamper(run_dir, change) -> None:
    path = run_dir / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())
    change(metrics)
    path.write_text(json.dumps(metrics))


def classification_run(tmp_path):
    expected = ["billing", "bug_report", "onboarding"] * 4
    raw = {
        "finetuned": ["billing", "bug_report", "onboarding"] * 3 + ["bug_report", "no idea", "onboarding"],
        "base": ["billing?", "Sure!", "onboarding", "x", "bug report", "y"] * 2,
    }
    inputs = [f"ticket {i}" for i in range(len(expected))]
    return write_run(tmp_path / "run", TaskSpec("classification", None, LABELS), inputs, expected, raw)


def test_classification_agrees_then_catches_a_changed_cell_and_score(tmp_path, verifier, capsys):
    metrics = classification_run(tmp_path)
    code, verdict = run_verifier(verifier, capsys, tmp_path / "run")
    assert code == 0 and verdict["ok"], verdict["mismatches"]
    assert verdict["recomputed_headline"]["finetuned"]["accuracy"] == pytest.approx(metrics["finetuned"]["accuracy"])

    def change(m):
        m["finetuned"]["confusion"]["matrix"][0][1] += 1
        m["base"]["macro_f1"] += 0.01
        m["finetuned"]["comparisons"]["base"]["accuracy"]["delta"] += 0.5

    tamper(tmp_path / "run", change)
    code, verdict = run_verifier(verifier, capsys, tmp_path / "run")
    assert code == 1 and not verdict["ok"]
    where = {m["where"] for m in verdict["mismatches"]}
    assert where == {"finetuned.confusion.matrix[0]", "base.macro_f1", "finetuned.comparisons.base.accuracy.delta"}


def test_a_parsed_answer_that_contradicts_its_raw_text_is_caught(tmp_path, verifier, capsys):
    classification_run(tmp_path)
    path = tmp_path / "run" / "eval" / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["finetuned"] = "onboarding"  # raw says "billing": scoring saw something the model did not say
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, verdict = run_verifier(verifier, capsys, tmp_path / "run")
    assert code == 1
    assert "finetuned.parsing" in {m["where"] for m in verdict["mismatches"]}


SCHEMA = {
    "type": "object", "required": ["queue", "urgent"], "additionalProperties": False,
    "properties": {"queue": {"enum": ["billing", "bugs"]}, "urgent": {"type": "boolean"}},
}


def test_json_task_with_schema_agrees_and_true_is_not_1(tmp_path, verifier, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    billing, bugs = '{"queue":"billing","urgent":true}', '{"queue":"bugs","urgent":false}'
    expected = [billing, bugs, billing, billing, bugs, bugs]
    raw = {
        "finetuned": ['{"queue": "billing", "urgent": 1}', '{"queue":"bugs","urgent":false}', "```json\n{}\n```",
                      '{"queue":"billing","urgent":true}', '{"queue":"bugs","urgent":false,"x":1}', '[1, 2]'],
        "few_shot": ['{"queue":"billing"}', "not json", '{"queue":"bugs","urgent":false}', "{", '"bugs"', '{"urgent":false}'],
    }
    spec = TaskSpec("json", None, fields=("queue", "urgent"), json_schema=SCHEMA)
    metrics = write_run(tmp_path / "run", spec, [f"t{i}" for i in range(6)], expected, raw, config={"json_schema": str(schema)})
    # tuneloop's own metric: {"urgent": 1} does not match {"urgent": true}
    assert metrics["finetuned"]["per_field"]["urgent"]["exact_match"] == pytest.approx(3 / 6)
    code, verdict = run_verifier(verifier, capsys, tmp_path / "run")
    assert code == 0 and verdict["ok"], verdict["mismatches"]
    assert verdict["recomputed_headline"]["finetuned"]["schema_compliance_rate"] == pytest.approx(2 / 6)

    tamper(tmp_path / "run", lambda m: m["few_shot"]["per_field"]["queue"].update(exact_match=1.0))
    code, verdict = run_verifier(verifier, capsys, tmp_path / "run")
    assert code == 1 and [m["where"] for m in verdict["mismatches"]] == ["few_shot.per_field.queue.exact_match"]


def test_generation_rouge_and_lengths_agree_and_a_changed_rouge_is_caught(tmp_path, verifier, capsys):
    expected = ["The refund arrives in five days.", "Restart the app, then log in again.", "Yes."]
    raw = {
        "finetuned": ["The refund arrives in 5 days.", "Restart the app, then log in again.", "  "],
        "base": ["I cannot help with refunds.", "Please restart", "Yes.\n"],
    }
    write_run(tmp_path / "run", TaskSpec("generation", None), ["a", "b", "c"], expected, raw)
    code, verdict = run_verifier(verifier, capsys, tmp_path / "run")
    assert code == 0 and verdict["ok"], verdict["mismatches"]
    assert verdict["recomputed_headline"]["base"]["exact_match"] == pytest.approx(1 / 3)

    tamper(tmp_path / "run", lambda m: m["finetuned"].update(rougeL=m["finetuned"]["rougeL"] + 1e-6))
    code, verdict = run_verifier(verifier, capsys, tmp_path / "run")
    assert code == 1 and [m["where"] for m in verdict["mismatches"]] == ["finetuned.rougeL"]


def test_unreadable_run_dir_exits_2(tmp_path, verifier, capsys):
    code, verdict = run_verifier(verifier, capsys, tmp_path)
    assert code == 2 and "metrics.json: not found" in verdict["error"]
