"""Every shipped example config validates, and its data files load and frame without a single error."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop.config import load_config
from tuneloop.train.prepare import load_split, prepare_data

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*/config.yaml"))
SHARED = Path(__file__).resolve().parents[3] / "shared"


def test_there_are_examples():
    assert CONFIGS, f"no example configs under {EXAMPLES}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.parent.name)
def test_example_config_and_data(path: Path):
    config = load_config(path)
    files = [config.train_file, config.validation_file, config.test_file]
    if any(f is not None and not f.exists() and "shared" in f.parts for f in files):
        pytest.skip(f"{path.parent.name} reads ../shared data, which is not beside this checkout")
    data = prepare_data(config)
    assert len(data.train) > 0
    test = load_split(config, config.test_file, data.spec)
    if data.spec.labels:
        assert {c.label for c in test} <= set(data.spec.labels)


def test_support_triage_is_large_varied_and_stratified():
    config = load_config(EXAMPLES / "support-triage" / "config.yaml")
    data = prepare_data(config)
    test = load_split(config, config.test_file, data.spec)
    assert len(data.train) + len(data.validation) + len(test) >= 900
    assert len(test) >= 150
    assert len(data.spec.labels) == 6
    texts = [c.prompt[-1].content for c in (*data.train, *data.validation, *test)]
    assert len(set(texts)) == len(texts), "duplicate tickets"
    shares = {label: sum(c.label == label for c in test) / len(test) for label in data.spec.labels}
    assert max(shares.values()) - min(shares.values()) < 0.05
