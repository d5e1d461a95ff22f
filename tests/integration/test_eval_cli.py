"""``tuneloop eval`` end to end on the tiny model: metrics with intervals, report, gate exit codes, JSON task,
no baselines, and bench/verify_eval.py recomputing every number from predictions.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import tiny_run_settings, write_jsonl
from tuneloop.cli.main import app

pytestmark = pytest.mark.integration

runner = CliRunner()
VERIFIER = Path(__file__).resolve().parents[2] / "bench" / "verify_eval.py"


def write_config(tmp_path, tiny_model_dir, tiny_dataset, **extra) -> str:
    config = {
        **tiny_run_settings(tiny_model_dir, tiny_dataset, tmp_path / "run"),
        "regression_max_new_tokens": 8,
        "bootstrap_samples": 200,
        **extra,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def trained_run(tmp_path, tiny_model_dir, tiny_dataset):
    config = write_config(tmp_path, tiny_model_dir, tiny_dataset)
    result = runner.invoke(app, ["train", config])
    assert result.exit_code == 0, result.output
    return config


def read_predictions(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()]


def test_eval_writes_intervals_comparisons_regression_and_report(tmp_path, trained_run):
    from sklearn.metrics import accuracy_score, f1_score

    result = runner.invoke(app, ["eval", trained_run])
    assert result.exit_code == 0, result.output
    assert "95% CI" in result.output and "report:" in result.output
    eval_dir = tmp_path / "run" / "eval"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert set(metrics) == {"finetuned", "base", "few_shot"}
    labels = ["billing", "bug_report", "onboarding"]
    rows = read_predictions(tmp_path)
    for system, values in metrics.items():
        expected = [r["expected"] for r in rows]
        predicted = [r[system] for r in rows]
        # recomputed independently of tuneloop's metric code
        assert values["accuracy"] == pytest.approx(accuracy_score(expected, predicted))
        assert values["macro_f1"] == pytest.approx(f1_score(expected, predicted, labels=labels, average="macro", zero_division=0))
        for name in ("accuracy", "macro_f1"):
            low, high = values["ci95"][name]
            assert low <= values[name] + 1e-9 and values[name] - 1e-9 <= high
    comparisons = metrics["finetuned"]["comparisons"]
    assert set(comparisons) == {"base", "few_shot"}
    for baseline, table in comparisons.items():
        assert table["accuracy"]["delta"] == pytest.approx(metrics["finetuned"]["accuracy"] - metrics[baseline]["accuracy"])
        assert 0.0 < table["accuracy"]["p_value"] <= 1.0
        assert table["accuracy"]["verdict"] in ("better", "worse", "no significant difference")
    assert metrics["finetuned"]["baselines"] == ["base", "few_shot"]
    for system in ("base", "finetuned"):
        regression = metrics[system]["regression"]
        assert regression["n"] == 40 and len(regression["answers"]) == 40
        assert regression["pass_rate"] == pytest.approx(sum(a["passed"] for a in regression["answers"]) / 40)
    assert "pass_rate" in metrics["finetuned"]["regression"]["vs_base"]
    report = (eval_dir / "report.html").read_text()
    for section in ("Headline", "Is the fine-tune really better?", "Training", "confusion matrix", "Worst failures", "Regression check"):
        assert section in report
    assert "data:image/png;base64," in report
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["eval"]["ci95"]["finetuned"]["accuracy"] == metrics["finetuned"]["ci95"]["accuracy"]

    code, verdict = verify(tmp_path / "run")
    assert code == 0 and verdict["ok"], verdict
    assert verdict["systems"] == ["finetuned", "base", "few_shot"] and verdict["numbers_checked"] > 50
    metrics["few_shot"]["per_label"]["billing"]["recall"] += 0.25  # a number that predictions.jsonl does not support
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    code, verdict = verify(tmp_path / "run")
    assert code == 1 and [m["where"] for m in verdict["mismatches"]] == ["few_shot.per_label.billing.recall"]


def verify(run_dir: Path) -> tuple[int, dict]:
    """bench/verify_eval.py as a user runs it: its own process, nothing shared with the evaluation."""
    done = subprocess.run([sys.executable, str(VERIFIER), str(run_dir)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout)


def test_eval_without_baselines_reports_the_finetune_alone(tmp_path, trained_run):
    result = runner.invoke(app, ["eval", trained_run, "--set", "baselines=[]"])
    assert result.exit_code == 0, result.output
    assert "no baseline evaluated" in result.output
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert list(metrics) == ["finetuned"]
    assert metrics["finetuned"]["baselines"] == [] and metrics["finetuned"]["comparisons"] == {}
    regression = metrics["finetuned"]["regression"]
    assert regression["n"] == 40 and regression["vs_base"] == {}
    report = (tmp_path / "run" / "eval" / "report.html").read_text()
    assert "No baseline was evaluated" in report
    assert "forgetting cannot be measured here" in report
    code, verdict = verify(tmp_path / "run")
    assert code == 0 and verdict["systems"] == ["finetuned"], verdict

    gated = runner.invoke(app, ["eval", trained_run, "--set", "baselines=[]", "--set", "gate={max_regression_drop: 0.05}"])
    assert gated.exit_code == 1
    assert "gate.max_regression_drop compares the fine-tune with the base model" in gated.output


def test_gate_failure_exits_3_and_names_the_condition(tmp_path, trained_run):
    gate = {"min_metric": {"macro_f1": 1.01 - 1e-9}, "min_gain": {"base": {"accuracy": -1.0}}}
    config = yaml.safe_load(open(trained_run))
    config["gate"] = gate
    config["regression_check"] = False
    open(trained_run, "w").write(yaml.safe_dump(config))
    result = runner.invoke(app, ["eval", trained_run])
    assert result.exit_code == 3, result.output
    assert "gate failed" in result.output and "finetuned macro_f1 >= 1.01" in result.output
    saved = json.loads((tmp_path / "run" / "eval" / "gate.json").read_text())
    assert saved["passed"] is False
    assert [c["passed"] for c in saved["checks"]] == [False, True]

    without = runner.invoke(app, ["eval", trained_run, "--set", "gate=null"])
    assert without.exit_code == 0, without.output
    assert not (tmp_path / "run" / "eval" / "gate.json").exists()  # no stale verdict left behind


def test_gate_pass_exits_0(tmp_path, trained_run):
    result = runner.invoke(
        app, ["eval", trained_run, "--set", "gate={min_metric: {accuracy: 0.0}, max_regression_drop: 1.0}"]
    )
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output


def test_gate_with_unknown_metric_fails_before_generating(tmp_path, trained_run):
    result = runner.invoke(app, ["eval", trained_run, "--set", "gate={min_metric: {macro_f2: 0.5}}"])
    assert result.exit_code == 1
    assert "gate: unknown metric(s) macro_f2" in result.output
    assert not (tmp_path / "run" / "eval" / "metrics.json").exists()


TICKETS_JSON = [
    ("refund my second charge please", {"queue": "billing", "priority": "high"}),
    ("charged twice this month", {"queue": "billing", "priority": "high"}),
    ("invoice has the wrong amount", {"queue": "billing", "priority": "normal"}),
    ("dashboard crashes on export", {"queue": "bug_report", "priority": "normal"}),
    ("the page is blank after login", {"queue": "bug_report", "priority": "high"}),
    ("how do I invite my team", {"queue": "onboarding", "priority": "low"}),
    ("where do I set roles for members", {"queue": "onboarding", "priority": "low"}),
    ("how to import a spreadsheet", {"queue": "onboarding", "priority": "low"}),
]

TEST_JSON = [
    ("why did the renewal cost more", {"queue": "billing", "priority": "normal"}),
    ("timeline view flickers and goes white", {"queue": "bug_report", "priority": "normal"}),
    ("can you show me how templates work", {"queue": "onboarding", "priority": "low"}),
    ("search returns nothing since update", {"queue": "bug_report", "priority": "high"}),
]


def messages_row(text: str, answer: dict) -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": json.dumps(answer, separators=(",", ":"))}]}


def test_json_task_reports_valid_and_schema_rates(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [messages_row(t, a) for t, a in TICKETS_JSON])
    test = write_jsonl(tmp_path / "test.jsonl", [messages_row(t, a) for t, a in TEST_JSON])
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({
        "type": "object", "required": ["queue", "priority"], "additionalProperties": False,
        "properties": {"queue": {"enum": ["billing", "bug_report", "onboarding"]}, "priority": {"enum": ["low", "normal", "high"]}},
    }))
    config = {
        "base_model": str(tiny_model_dir), "task": "json", "train_file": str(train), "test_file": str(test),
        "json_schema": str(schema), "output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 4,
        "precision": "fp32", "few_shot_k": 2, "max_new_tokens": 24, "regression_check": False, "bootstrap_samples": 100,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    trained = runner.invoke(app, ["train", str(path)])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["eval", str(path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"finetuned", "base", "few_shot"}
    rows = read_predictions(tmp_path)
    for system, values in metrics.items():
        valid = [r[system] != "<invalid>" for r in rows]
        assert values["valid_json_rate"] == pytest.approx(sum(valid) / len(rows))
        assert values["schema_compliance_rate"] <= values["valid_json_rate"]
        assert set(values["per_field"]) == {"queue", "priority"}
        assert set(values["ci95"]) == {"valid_json_rate", "schema_compliance_rate", "field_accuracy", "exact_match"}
    assert json.loads(rows[0]["expected"]) == TEST_JSON[0][1]
    assert "JSON details" in (tmp_path / "run" / "eval" / "report.html").read_text()
    code, verdict = verify(tmp_path / "run")  # schema compliance recomputed with jsonschema, schema from config.yaml
    assert code == 0 and verdict["task"] == "json", verdict
