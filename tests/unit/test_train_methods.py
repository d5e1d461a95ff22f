"""Training robustness on the tiny model: early stopping, best checkpoint, SIGTERM, epoch-boundary resume,
refused resumes, gradient checkpointing, the recipe and optimizer registries, experiment tracking."""

from __future__ import annotations

import json
import os
import signal
import typing

import pytest
import torch
from safetensors.torch import load_file

from tuneloop import train
from tuneloop.train import Preempted, RunDirectoryError
from tuneloop.train.checkpoint import TrainerState, complete_checkpoints, latest_checkpoint
from tuneloop.train.stopping import judge

pytestmark = pytest.mark.unit


class Observer:
    """Calls ``action`` at optimizer step ``step`` (a crash, a signal)."""

    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_train_start(self, total_steps, done_steps):
        pass

    def on_step(self, step, metrics):
        if step == self.step:
            self.action()

    def on_epoch_end(self, epoch, metrics):
        pass

    def on_train_end(self):
        pass


def crash():
    raise KeyboardInterrupt("simulated crash")


def curve(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in rows]


def same_curve(a, b, tolerance=1e-6):
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [v for _, v in a] == pytest.approx([v for _, v in b], abs=tolerance)


# --- early stopping and the best checkpoint ----------------------------------------------------------------


def test_judge_counts_patience_and_min_delta():
    state = TrainerState(step=1, epoch=0, batches_done_in_epoch=1, fingerprint="f")
    first = judge(state, 1.0, patience=2, min_delta=0.1)
    assert first.improved and not first.stop and first.state.best_step == 1
    small = judge(first.state, 0.95, patience=2, min_delta=0.1)  # better, but by less than min_delta
    assert not small.improved and small.state.evals_without_improvement == 1 and not small.stop
    worse = judge(small.state, 1.2, patience=2, min_delta=0.1)
    assert worse.stop and worse.state.best_val_loss == 1.0
    assert not judge(state, None, patience=1, min_delta=0.0).stop  # no validation data: never stops


def test_early_stopping_stops_and_a_resume_does_not_train_on(tiny_config):
    # min_delta larger than any possible drop: the first validation is the best, the next one exhausts patience 1
    config = tiny_config(epochs=5, eval_every_steps=1, early_stopping_patience=1, early_stopping_min_delta=100.0)
    result = train.run(config)
    assert result.stopped_early and result.steps == 2
    record = json.loads((config.output_dir / "record.json").read_text())
    assert record["train"]["stopped_early"] and record["train"]["best_step"] == 1
    again = train.run(config, resume=True)
    assert again.steps == 2  # the stop is part of the checkpointed state


def test_best_checkpoint_is_kept_and_becomes_the_artifact(tiny_config):
    config = tiny_config(
        epochs=3, eval_every_steps=1, keep_checkpoints=1, select_best_checkpoint=True, learning_rate=0.05
    )
    result = train.run(config)
    record = json.loads((config.output_dir / "record.json").read_text())
    best = record["train"]["best_step"]
    names = [p.name for p in complete_checkpoints(config.output_dir / "checkpoints")]
    assert f"step-{best}" in names and f"step-{result.steps}" in names  # newest 1 + the protected best
    validations = {s: v for s, v in curve(config.output_dir) if s and v is not None}
    rows = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert best == min(val, key=val.get) and validations
    saved = load_file(config.output_dir / "adapter" / "adapter_model.safetensors")
    checkpoint = load_file(config.output_dir / "checkpoints" / f"step-{best}" / "trainable.safetensors")
    lora_b = sorted(k for k in checkpoint if "lora_B" in k)[0]
    stored = [v for k, v in saved.items() if k.replace(".weight", "") in lora_b.replace(".default", "")]
    assert stored and torch.equal(stored[0], checkpoint[lora_b])
    if best != result.steps:
        assert result.best_checkpoint is not None and result.best_checkpoint.name == f"step-{best}"


# --- resume ------------------------------------------------------------------------------------------------


def test_resume_exactly_at_an_epoch_boundary_still_trains(tiny_config, tmp_path):
    reference = train.run(tiny_config(output_dir=str(tmp_path / "ref"), epochs=3))
    config = tiny_config(output_dir=str(tmp_path / "cut"), epochs=3)  # checkpoints only at epoch ends
    with pytest.raises(KeyboardInterrupt):
        train.run(config, observer=Observer(4, crash))  # dies in the first step of epoch 2
    last = latest_checkpoint(config.output_dir / "checkpoints")
    assert last.name == "step-3"
    assert json.loads((last / "state.json").read_text())["trainer"]["batches_done_in_epoch"] == 0
    resumed = train.run(config, resume=True)
    assert resumed.steps == 9 and resumed.epochs == 3
    same_curve(curve(resumed.output_dir), curve(reference.output_dir))


@pytest.mark.parametrize(
    "change", [{"batch_size": 2}, {"max_seq_len": 200}, {"grad_accum": 2}], ids=["batch_size", "max_seq_len", "grad_accum"]
)
def test_resume_with_changed_batching_is_refused(tiny_config, change):
    config = tiny_config(epochs=1)
    train.run(config)
    with pytest.raises(RunDirectoryError, match="other data, sequence length, batch size"):
        train.run(tiny_config(epochs=1, **change), resume=True)


def test_resume_with_changed_data_is_refused(tiny_config, tiny_dataset):
    config = tiny_config(epochs=1)
    train.run(config)
    path = tiny_dataset["train"]
    path.write_text(path.read_text().replace("refund my second charge please", "refund my third charge please"))
    with pytest.raises(RunDirectoryError, match="other data"):
        train.run(config, resume=True)


def test_sigterm_writes_a_checkpoint_then_stops_and_resume_matches(tiny_config, tmp_path):
    reference = train.run(tiny_config(output_dir=str(tmp_path / "ref")))
    config = tiny_config(output_dir=str(tmp_path / "term"))
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="--resume"):
        train.run(config, observer=Observer(2, lambda: os.kill(os.getpid(), signal.SIGTERM)))
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler does not outlive the run
    assert latest_checkpoint(config.output_dir / "checkpoints").name == "step-2"
    resumed = train.run(config, resume=True)
    same_curve(curve(resumed.output_dir), curve(reference.output_dir))


def test_max_steps_mid_epoch_validates_and_checkpoints(tiny_config):
    config = tiny_config(epochs=3, max_steps=4)
    result = train.run(config)
    assert result.steps == 4 and result.val_loss is not None
    assert latest_checkpoint(config.output_dir / "checkpoints").name == "step-4"


# --- methods, optimizers, recipes --------------------------------------------------------------------------


def test_gradient_checkpointing_changes_memory_not_the_result(tiny_config, tmp_path):
    off = train.run(tiny_config(output_dir=str(tmp_path / "off"), lora_dropout=0.0, epochs=1))
    on = train.run(tiny_config(output_dir=str(tmp_path / "on"), lora_dropout=0.0, epochs=1, gradient_checkpointing=True))
    same_curve(curve(on.output_dir), curve(off.output_dir), tolerance=1e-5)


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneloop.adapters import get_adapter_method

    config = tiny_config(use_rslora=True, lora_r=4, lora_alpha=8)
    model = get_adapter_method("lora").apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    scalings = [m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    assert scalings and all(s == pytest.approx(8 / 4**0.5) for s in scalings)  # rsLoRA alpha/sqrt(r), not alpha/r = 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("options", [{"optimizer": "adamw_8bit"}, {"optimizer": "paged_adamw"}, {"adapter": "qlora"}])
def test_gpu_only_choices_fail_clearly_on_cpu(tiny_config, options):
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        train.run(tiny_config(**options))


def test_recipe_registry_matches_the_config_choices():
    from tuneloop.config import RunConfig

    choices = set(typing.get_args(RunConfig.model_fields["method"].annotation))
    assert choices == set(train.RECIPES)


def test_full_fine_tuning_trains_every_weight(tiny_config):
    result = train.run(tiny_config(adapter="full", epochs=1))
    assert (result.output_dir / "model" / "model.safetensors").is_file()
    checkpoint = load_file(latest_checkpoint(result.output_dir / "checkpoints") / "trainable.safetensors")
    assert any("embed_tokens" in k for k in checkpoint)


# --- tracking ----------------------------------------------------------------------------------------------


def test_tensorboard_logs_train_and_eval_scalars(tiny_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(epochs=1, report_to=["tensorboard"])
    train.run(config)
    events = EventAccumulator(str(config.output_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/val_loss"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_a_tracker_asked_for_but_missing_is_an_error_before_training(tiny_config):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    config = tiny_config(report_to=["wandb"])
    with pytest.raises(RuntimeError, match="pip install wandb"):
        train.run(config)
    assert not (config.output_dir / "checkpoints").exists()
