"""The SFT recipe on a tiny random model: artefacts, determinism, logging, exact resume after a crash."""

from __future__ import annotations

import json

import pytest

from tuneloop import train
from tuneloop.train import RunDirectoryError

pytestmark = pytest.mark.unit


class CrashAt:
    """An observer that kills training at a given step, like a SIGKILL between two steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_start(self, total_steps, done_steps):
        pass

    def on_step(self, step, metrics):
        if step == self.step:
            raise KeyboardInterrupt("simulated crash")

    def on_epoch_end(self, epoch, metrics):
        pass

    def on_train_end(self):
        pass


def losses(run_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock throughput column."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def assert_same_curve(actual: list[dict], expected: list[dict], tolerance: float = 1e-6) -> None:
    assert [sorted(r) for r in actual] == [sorted(r) for r in expected]
    for mine, theirs in zip(actual, expected):
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, abs=tolerance), (key, mine, theirs)


def test_run_writes_the_run_directory(tiny_config):
    config = tiny_config()
    result = train.run(config)
    out = config.output_dir
    for name in ("config.yaml", "record.json", "data_report.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "tuneloop.json").is_file()
    assert result.steps == 2 * 3 and result.epochs == 2  # 12 examples / batch 4 = 3 steps per epoch
    record = json.loads((out / "record.json").read_text())
    assert record["chat_format"]["eot_token"] == "<|im_end|>"
    assert record["task"]["labels"] == ["billing", "bug_report", "onboarding"]
    assert record["inputs"]["train"]["sha256"]
    rows = losses(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert all(r["loss"] > 0 for r in rows if "loss" in r)
    assert [r["epoch"] for r in rows if "val_loss" in r] == [1, 2]


def test_same_seed_same_losses(tiny_config, tmp_path):
    first = train.run(tiny_config(output_dir=str(tmp_path / "a")))
    second = train.run(tiny_config(output_dir=str(tmp_path / "b")))
    assert_same_curve(losses(first.output_dir), losses(second.output_dir), tolerance=0.0)


def test_grad_accum_leaves_the_loss_unchanged(tiny_config, tmp_path):
    """batch 4 x accum 1 and batch 2 x accum 2 see different batch groupings, so compare one fixed window."""
    a = train.run(tiny_config(output_dir=str(tmp_path / "a"), batch_size=12, grad_accum=1, epochs=1, lora_dropout=0.0))
    b = train.run(tiny_config(output_dir=str(tmp_path / "b"), batch_size=6, grad_accum=2, epochs=1, lora_dropout=0.0))
    # one optimizer step over all 12 examples either way: the same loss and the same resulting validation loss
    assert a.steps == b.steps == 1
    assert a.final_loss == pytest.approx(b.final_loss, rel=1e-5)
    assert a.val_loss == pytest.approx(b.val_loss, rel=1e-5)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_config, tmp_path):
    reference = train.run(tiny_config(output_dir=str(tmp_path / "ref"), save_every_steps=1))
    config = tiny_config(output_dir=str(tmp_path / "crash"), save_every_steps=1)
    with pytest.raises(KeyboardInterrupt):
        train.run(config, observer=CrashAt(step=4))
    resumed = train.run(config, resume=True)
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "step-3"
    assert_same_curve(losses(resumed.output_dir), losses(reference.output_dir))
    assert resumed.final_loss == pytest.approx(reference.final_loss, abs=1e-6)


def test_existing_run_is_never_overwritten_silently(tiny_config):
    config = tiny_config(epochs=1)
    train.run(config)
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        train.run(config)
    train.run(config, overwrite=True)
