"""The real CLI end to end on the tiny model: train -> eval -> predict, and clean errors for bad input."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import tiny_run_settings
from tuneloop.cli.main import app

pytestmark = pytest.mark.integration

runner = CliRunner()


def write_config(tmp_path, tiny_model_dir, tiny_dataset, **extra) -> str:
    config = {**tiny_run_settings(tiny_model_dir, tiny_dataset, tmp_path / "run"), "epochs": 1, **extra}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_train_eval_predict(tmp_path, tiny_model_dir, tiny_dataset):
    config = write_config(tmp_path, tiny_model_dir, tiny_dataset)
    trained = runner.invoke(app, ["train", config, "--set", "learning_rate=0.001"])
    assert trained.exit_code == 0, trained.output
    assert "training time" in trained.output

    evaluated = runner.invoke(app, ["eval", config])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"finetuned", "base", "few_shot"}
    for system in metrics.values():
        assert 0.0 <= system["accuracy"] <= 1.0 and 0.0 <= system["macro_f1"] <= 1.0
        assert system["n"] == 6
    predictions = [json.loads(l) for l in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6
    recomputed = sum(p["finetuned"] == p["expected"] for p in predictions) / len(predictions)
    assert recomputed == pytest.approx(metrics["finetuned"]["accuracy"])
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["eval"]["headline"]["finetuned"]["accuracy"] == metrics["finetuned"]["accuracy"]

    predicted = runner.invoke(app, ["predict", str(tmp_path / "run"), "charged twice this month"])
    assert predicted.exit_code == 0, predicted.output
    assert predicted.output.strip()


def test_bad_config_is_one_clear_line_and_exit_1(tmp_path, tiny_model_dir, tiny_dataset):
    config = write_config(tmp_path, tiny_model_dir, tiny_dataset, lora_rnk=4)
    result = runner.invoke(app, ["train", config])
    assert result.exit_code == 1
    assert "lora_rnk: unknown key (did you mean 'lora_r'?)" in result.output
    assert "Traceback" not in result.output


def test_bad_data_row_names_file_and_line(tmp_path, tiny_model_dir, tiny_dataset):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok", "label": "billing"}\n{"text": "ok", "label": "onboarding"}\n{"text": 3, "label": "x"}\n')
    config = write_config(tmp_path, tiny_model_dir, tiny_dataset, train_file=str(broken))
    result = runner.invoke(app, ["train", config])
    assert result.exit_code == 1
    assert "broken.jsonl:3: field 'text': must be a string, got int" in result.output.replace("\n", "")
    assert "Traceback" not in result.output


def test_chat_reads_turns_from_stdin(tmp_path, tiny_model_dir, tiny_dataset):
    config = write_config(tmp_path, tiny_model_dir, tiny_dataset)
    assert runner.invoke(app, ["train", config]).exit_code == 0
    result = runner.invoke(app, ["chat", str(tmp_path / "run")], input="hello there\nand again\n\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("model>") == 2


def test_predict_on_a_folder_without_a_run_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["predict", str(tmp_path), "hi"])
    assert result.exit_code == 1
    assert "no trained model here" in " ".join(result.output.split())
    assert "Traceback" not in result.output
