"""A typo inside a nested section is named by its path and matched against that section's own keys."""

from __future__ import annotations

import pytest

from tuneloop.config import ConfigError, validate_config

pytestmark = pytest.mark.unit

BASE = {"train_file": "train.csv", "test_file": "test.csv"}
JUDGE = {"base_url": "http://127.0.0.1:8000/v1", "model": "judge", "rubric": "correct and short"}


def problems(**section) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_config({**BASE, **section}, source="run.yaml")
    return str(caught.value)


def test_gate_typo_names_the_nested_path_and_suggests_a_gate_key():
    message = problems(gate={"min_metrc": {"macro_f1": 0.9}})
    assert "gate.min_metrc: unknown key (did you mean 'min_metric'?)" in message
    assert "did you mean 'gate'" not in message


def test_judge_typo_suggests_from_the_judge_keys():
    message = problems(judge={**JUDGE, "mdoe": "pairwise"})
    assert "judge.mdoe: unknown key (did you mean 'mode'?)" in message


def test_endpoint_baseline_typo_names_its_position_without_the_union_noise():
    endpoint = {"name": "paid", "base_url": "http://x/v1", "model": "m", "api_key_evn": "KEY"}
    message = problems(baselines=["base", endpoint])
    assert "baselines[1].api_key_evn: unknown key (did you mean 'api_key_env'?)" in message
    assert "literal" not in message.lower()  # the string branch of the union ('base'/'few_shot') is not the problem
    assert message.count("\n") == 1  # one problem, one line


def test_missing_nested_key_is_named_by_its_path():
    message = problems(judge={"base_url": "http://x/v1", "model": "m"})
    assert "judge.rubric: required key is missing" in message


def test_a_typo_without_a_close_match_gets_no_suggestion():
    message = problems(gate={"zzzz": 1})
    assert "gate.zzzz: unknown key\n" in message + "\n"


def test_top_level_suggestions_still_come_from_the_top_level():
    assert "lora_rank: unknown key (did you mean 'lora_r'?)" in problems(lora_rank=8)


def test_a_value_fitting_no_union_member_is_named_by_its_position():
    message = problems(baselines=["base", 5])
    assert "baselines[1]: Input should be 'base' or 'few_shot' (got 5)" in message
    assert "literal[" not in message and ".EndpointBaseline" not in message
