"""``bench/train_throughput.py --dry-run`` end to end on CPU: real processes, the tiny shape, hf+peft and tuneloop.

The same orchestrator, workers, stacks and rows as on the GPU, only small: what the device run needs to
work is exercised here before device time is spent on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

KEYS = {"stack", "method", "workload", "tok_per_s", "peak_gib", "mfu", "gpu", "warmup_s", "steps_timed", "first_loss"}


def test_dry_run_prints_one_row_per_stack_and_workload(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench/train_throughput.py"), "--dry-run", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    saved = [json.loads(line) for line in (tmp_path / "train_throughput.jsonl").read_text().splitlines()]
    assert printed == saved
    assert sorted((r["stack"], r["workload"]) for r in saved) == [
        ("hf+peft", "a"), ("hf+peft", "b"), ("tuneloop", "a"), ("tuneloop", "b")
    ]
    log = (tmp_path / "train_throughput.log").read_text()
    for row in saved:
        assert "error" not in row, f"{row}\n{log[-4000:]}"
        assert KEYS <= row.keys()
        assert row["tok_per_s"] > 0 and 0 < row["mfu"] < 1
        assert abs(row["first_loss"] - row["ln_vocab"]) < 1.0  # random weights: near-uniform predictions
    by_stack = {(r["stack"], r["workload"]): r for r in saved}
    # same batches for both stacks; the padded one computes its padding, the packed one does not
    assert by_stack["hf+peft", "b"]["real_tokens"] == by_stack["tuneloop", "b"]["real_tokens"]
    assert by_stack["hf+peft", "b"]["processed_tokens"] > by_stack["tuneloop", "b"]["processed_tokens"]
    # same seeded weights and batches: the first loss of padded (HF) and packed (tuneloop) rows agrees
    for workload in ("a", "b"):
        assert by_stack["hf+peft", workload]["first_loss"] == pytest.approx(by_stack["tuneloop", workload]["first_loss"], abs=1e-3)
