"""A run records where its seconds went before the first step (record.json ``startup_seconds``)."""

from __future__ import annotations

import json
import time

import pytest

from tuneloop import train

pytestmark = pytest.mark.unit


def test_record_names_each_setup_phase_and_they_fit_in_the_call(tiny_config, tmp_path):
    config = tiny_config(output_dir=str(tmp_path / "run"), max_steps=1)
    started = time.perf_counter()
    result = train.run(config)
    elapsed = time.perf_counter() - started
    startup = json.loads((result.output_dir / "record.json").read_text())["startup_seconds"]
    assert list(startup) == ["start_and_tokenizer", "data_read", "data_encode", "model", "optimizer"]
    assert all(isinstance(s, float) and s >= 0 for s in startup.values())
    assert sum(startup.values()) + result.train_seconds <= elapsed
