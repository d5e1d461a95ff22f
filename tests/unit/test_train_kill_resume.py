"""SIGKILL at random moments, three times: the resumed run ends on the uninterrupted run's loss curve.

A real ``kill -9`` of a training subprocess, not a simulated exception: the process can die inside a
checkpoint write, a metrics line or an optimizer step. Resume must pick the last *complete* checkpoint and
replay the same batches with the same optimizer, scheduler and RNG state. The kill points are drawn from
a fresh seed each run (printed on failure, to reproduce it). Runs on the GPU too when there is one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tuneloop import train

pytestmark = pytest.mark.unit

TRAIN = "from tuneloop import train; from tuneloop.config import load_config; import sys; train.run(load_config(sys.argv[1]), resume=True)"


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in rows]


def logged_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_three_random_sigkills_resume_to_the_uninterrupted_loss(tiny_config, tmp_path):
    options = dict(epochs=4, batch_size=2, save_every_steps=1, keep_checkpoints=2, report_to="none", lora_dropout=0.1)
    reference = train.run(tiny_config(output_dir=str(tmp_path / "reference"), **options))
    config = tiny_config(output_dir=str(tmp_path / "killed"), **options)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    metrics = config.output_dir / "metrics.jsonl"
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    kills = 0
    while kills < 3:
        start_lines = logged_lines(metrics)
        process = subprocess.Popen([sys.executable, "-c", TRAIN, str(path)], env=env, stderr=subprocess.PIPE)
        wait_for = rng.randint(1, 4)  # new log lines (optimizer steps) before the kill...
        deadline = time.monotonic() + 120
        while process.poll() is None and logged_lines(metrics) < start_lines + wait_for and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.04))  # ...then anywhere inside the next step or checkpoint write
        if process.poll() is not None:
            pytest.fail(f"seed {seed}: training ended before kill {kills + 1}: {process.stderr.read().decode()[-2000:]}")
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    finished = subprocess.run([sys.executable, "-c", TRAIN, str(path)], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, f"seed {seed}: {finished.stderr[-3000:]}"
    resumed, expected = loss_curve(config.output_dir), loss_curve(reference.output_dir)
    assert [s for s, _ in resumed] == [s for s, _ in expected], f"seed {seed}"
    for (step, mine), (_, theirs) in zip(resumed, expected):
        assert mine == pytest.approx(theirs, abs=1e-3), f"seed {seed}: step {step}"
    assert resumed[-1][1] == pytest.approx(reference.final_loss if reference.val_loss is None else reference.val_loss, abs=1e-3)
    assert not list((config.output_dir / "checkpoints").glob(".tmp-*"))  # a killed write leaves nothing behind
