"""Config validation: defaults, errors that name the file and key, overrides, docs in sync."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop.config import ConfigError, RunConfig, load_config, parse_override

pytestmark = pytest.mark.unit

SIX_LINES = """\
base_model: smollm2-135m-instruct
task: classification
train_file: data/train.csv
validation_file: data/validation.csv
test_file: data/test.csv
output_dir: runs/triage
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_six_line_config_works_with_defaults(tmp_path):
    config = load_config(write(tmp_path, SIX_LINES))
    assert config.adapter == "lora" and config.lora_r == 16 and config.epochs == 3
    assert config.train_file == (tmp_path / "data/train.csv").resolve()
    assert config.output_dir == Path("runs/triage")


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, SIX_LINES + "lora_rank: 8\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "lora_rank: unknown key (did you mean 'lora_r'?)" in message


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"epochs: .*integer.*'three'"):
        load_config(write(tmp_path, SIX_LINES + "epochs: three\n"))


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "task: classification\nlearning_rate: -1\nadapter: lorra\n"))
    message = str(caught.value)
    for key in ("train_file: required key is missing", "learning_rate", "adapter: unknown adapter 'lorra'"):
        assert key in message


def test_unknown_task_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'clasification'; known: classification"):
        load_config(write(tmp_path, SIX_LINES.replace("task: classification", "task: clasification")))


def test_bad_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml:2: not valid YAML"):
        load_config(write(tmp_path, "task: classification\n  bad: [indent\n"))


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, SIX_LINES)
    config = load_config(path, dict(parse_override(o) for o in ["epochs=1", "lora_target_modules=[q_proj,v_proj]"]))
    assert config.epochs == 1
    assert config.lora_target_modules == ("q_proj", "v_proj")
    with pytest.raises(ConfigError, match="override 'epochs' is not of the form key=value"):
        parse_override("epochs")


def test_config_is_frozen(tmp_path):
    config = load_config(write(tmp_path, SIX_LINES))
    with pytest.raises(Exception):
        config.epochs = 9  # type: ignore[misc]


def test_docs_list_every_key_with_its_default():
    from tuneloop.config.docs import render_config_reference

    docs = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert docs.read_text() == render_config_reference(), "docs/config.md is stale: run `python -m tuneloop.config.docs`"
    for key in RunConfig.model_fields:
        assert f"`{key}`" in docs.read_text()
