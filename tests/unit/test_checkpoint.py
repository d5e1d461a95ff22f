"""Atomic checkpoints: round trip of weights, optimizer, scheduler and RNG; partial ones are never picked."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import get_scheduler

from tuneloop.train.checkpoint import (
    COMPLETE_MARKER,
    TrainerState,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.unit


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # frozen weights are not checkpointed
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    return model, optimizer, scheduler


def step(model, optimizer, scheduler) -> None:
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_round_trip_restores_everything(tmp_path):
    model, optimizer, scheduler = setup()
    for _ in range(3):
        step(model, optimizer, scheduler)
    state = TrainerState(step=3, epoch=1, batches_done_in_epoch=2, fingerprint="abc", best_val_loss=0.5)
    path = save_checkpoint(tmp_path, state, model, optimizer, scheduler, keep=2)
    expected_draw = (torch.rand(1).item(), random.random())
    step(model, optimizer, scheduler)
    after_one_more = [p.clone() for p in model.parameters()]

    frozen_reference = setup()[0][0].weight.detach().clone()
    fresh_model, fresh_optimizer, fresh_scheduler = setup()  # same frozen base, as when reloading a model
    with torch.no_grad():
        for parameter in fresh_model[1].parameters():
            parameter.add_(1.0)  # trainable weights the checkpoint must overwrite
    restored = load_checkpoint(path, fresh_model, fresh_optimizer, fresh_scheduler)
    assert restored == state
    assert (torch.rand(1).item(), random.random()) == expected_draw  # RNG streams continue identically
    torch.testing.assert_close(fresh_model[0].weight, frozen_reference)  # frozen: untouched
    step(fresh_model, fresh_optimizer, fresh_scheduler)  # same data draw, optimizer moments and lr
    for mine, theirs in zip(fresh_model.parameters(), after_one_more):
        torch.testing.assert_close(mine, theirs)


def test_partial_checkpoints_are_ignored(tmp_path):
    model, optimizer, scheduler = setup()
    save_checkpoint(tmp_path, TrainerState(2, 0, 2, "f"), model, optimizer, scheduler, keep=5)
    (tmp_path / "step-4").mkdir()  # killed before its marker was written
    (tmp_path / ".tmp-step-6-123").mkdir()  # killed mid-write
    assert latest_checkpoint(tmp_path).name == "step-2"
    assert (latest_checkpoint(tmp_path) / COMPLETE_MARKER).is_file()


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    model, optimizer, scheduler = setup()
    for n in (1, 2, 3, 10):
        save_checkpoint(tmp_path, TrainerState(n, 0, n, "f"), model, optimizer, scheduler, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-3", "step-10"]
    assert not list(tmp_path.glob(".tmp-*"))
