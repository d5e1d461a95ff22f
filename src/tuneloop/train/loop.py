"""The optimisation loop every recipe shares: resumable epochs, accumulation, validation, stopping, checkpoints.

A recipe (SFT, DPO) supplies what differs — how an epoch is batched, what one micro-batch's loss is, how
validation is scored — as a :class:`LoopData` and an :class:`Objective`; this module owns what must be
identical across recipes for a resumed run to equal an uninterrupted one:

* the position in the data is ``(epoch, batches done)`` and each epoch's order is a pure function of the
  seed, so a resume replays exactly the batches that were left;
* every validation writes a checkpoint (so early stopping and best-checkpoint selection always have one);
* SIGTERM becomes a checkpoint at the next step boundary, then :class:`~tuneloop.train.preempt.Preempted`;
* with several processes, each optimizer step's window of micro-batches is dealt out round-robin and the
  loss is normalised by the window's global count, so N GPUs take the same steps as one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from tuneloop.config import RunConfig
from tuneloop.train.batching import real_tokens, to_device
from tuneloop.train.checkpoint import (
    TrainerState,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from tuneloop.train.observer import TrainObserver
from tuneloop.train.preempt import Preempted, sigterm_requests_checkpoint
from tuneloop.train.rundir import RunDirectoryError, append_jsonl, truncate_metrics
from tuneloop.train.stopping import judge

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """What one micro-batch contributes.

    ``count``: the loss units of a batch, known before the forward pass (trained tokens for SFT, pairs for
    DPO); every micro-loss is divided by the whole window's count. ``forward``: the *summed* loss and
    summed statistics (e.g. DPO's correct pairs) of a batch. ``count_name`` names the unit in the log.
    """

    count: Callable[[Batch], int]
    forward: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    count_name: str = "trained_tokens"


@dataclass(frozen=True)
class LoopData:
    epoch_batches: Callable[[int], list[list[int]]]
    collate: Callable[[list[int]], Batch]
    validate: Callable[[], dict[str, float | None]]  # always holds "val_loss" (None without validation data)
    steps_per_epoch: int


@dataclass
class Loop:
    """Everything the loop works on, set up by the recipe."""

    config: RunConfig
    out: Path
    accelerator: Accelerator
    module: torch.nn.Module  # the prepared (possibly DDP/FSDP-wrapped) loss module
    model: torch.nn.Module  # the unwrapped model whose trainable weights are checkpointed
    optimizer: Any
    scheduler: Any
    observer: TrainObserver
    fingerprint: str
    precision: Any  # setup.MixedPrecision: autocast (and fp16 loss scaling) for the forward passes


@dataclass(frozen=True)
class LoopResult:
    state: TrainerState
    last_loss: float | None
    last_validation: dict[str, float | None]
    seconds: float
    tokens: int
    resumed_from: Path | None
    restored_best: Path | None


def total_steps(config: RunConfig, steps_per_epoch: int) -> int:
    return int(min(config.epochs * steps_per_epoch, config.max_steps or float("inf")))


def run_loop(loop: Loop, data: LoopData, objective: Objective, *, resume: bool) -> LoopResult:
    config, acc = loop.config, loop.accelerator
    checkpoints = loop.out / "checkpoints"
    metrics_path = loop.out / "metrics.jsonl"
    state = TrainerState(step=0, epoch=0, batches_done_in_epoch=0, fingerprint=loop.fingerprint)
    resumed_from = latest_checkpoint(checkpoints) if resume else None
    if resumed_from is not None:
        saved = load_checkpoint(resumed_from, loop.model, loop.optimizer, loop.scheduler, rank=acc.process_index)
        if saved.fingerprint != state.fingerprint:
            raise RunDirectoryError(
                f"{resumed_from}: checkpoint was made with other data, sequence length, batch size, seed or "
                "number of processes; resume needs the same inputs (start a new output_dir to train on changed data)"
            )
        state = saved
    if acc.is_main_process:
        truncate_metrics(metrics_path, after_step=state.step)
    steps = total_steps(config, data.steps_per_epoch)
    window_size = config.grad_accum * acc.num_processes
    log = _LogWindow(objective.count_name)
    scaler = loop.precision.grad_scaler()
    last_loss: float | None = None
    last_validation: dict[str, float | None] = {}

    def checkpoint(at: TrainerState) -> Path:
        rng = _gather_rng(acc)
        return save_checkpoint(
            checkpoints, at, loop.model, loop.optimizer, loop.scheduler, config.keep_checkpoints,
            protect_step=at.best_step, writer=acc.is_main_process, rng=rng,
        )  # fmt: skip

    def validate(at: TrainerState, epoch_label: int) -> TrainerState:
        nonlocal last_validation
        last_validation = data.validate()
        verdict = judge(at, last_validation.get("val_loss"), config.early_stopping_patience, config.early_stopping_min_delta)
        at = replace(verdict.state, stopped_early=verdict.stop)
        if acc.is_main_process:
            row = {"step": at.step, "epoch": epoch_label, **last_validation}
            append_jsonl(metrics_path, row)
            loop.observer.on_epoch_end(epoch_label, row)
        checkpoint(at)
        return at

    loop.observer.on_train_start(steps, state.step)
    started = time.perf_counter()
    with sigterm_requests_checkpoint() as stop_request:
        for epoch in range(state.epoch, config.epochs):
            if state.stopped_early or state.step >= steps:
                break
            batches = data.epoch_batches(epoch)
            first = state.batches_done_in_epoch if epoch == state.epoch else 0
            for start in range(first, len(batches), window_size):
                if state.step >= steps:
                    break
                window = batches[start : start + window_size]
                loss_sum, count, stats, tokens = _optimizer_step(loop, data, objective, window, scaler)
                done = start + len(window)
                state = replace(state, step=state.step + 1, epoch=epoch, batches_done_in_epoch=done)
                log.add(loss_sum, count, tokens, stats)
                if state.step % config.logging_steps == 0 or state.step == steps:
                    row = log.flush(state.step, epoch, loop.scheduler.get_last_lr()[0])
                    if row is not None:
                        last_loss = row["loss"]
                        if acc.is_main_process:
                            append_jsonl(metrics_path, row)
                            loop.observer.on_step(state.step, row)
                epoch_ends = done >= len(batches)
                if not epoch_ends and (state.step >= steps or _every(state.step, config.eval_every_steps)):
                    state = validate(state, epoch + 1)  # mid-epoch validation, or max_steps reached mid-epoch
                elif not epoch_ends and _every(state.step, config.save_every_steps):
                    checkpoint(state)
                if _any_process(acc, stop_request.requested):
                    raise Preempted(checkpoint(state))
                if state.stopped_early:
                    break
            else:
                state = validate(replace(state, epoch=epoch + 1, batches_done_in_epoch=0), epoch + 1)
                if _any_process(acc, stop_request.requested):
                    raise Preempted(checkpoint(state))
                continue
            break
    seconds = time.perf_counter() - started
    restored = None
    if config.select_best_checkpoint and state.best_step is not None and state.best_step != state.step:
        restored = checkpoints / f"step-{state.best_step}"
        load_weights(restored, loop.model)
    loop.observer.on_train_end()
    return LoopResult(state, last_loss, last_validation, seconds, log.total_tokens, resumed_from, restored)


def _every(step: int, interval: int | None) -> bool:
    return bool(interval) and step % interval == 0


def _any_process(acc: Accelerator, flag: bool) -> bool:
    """Whether any process saw the flag: all ranks must stop at the same step or collectives hang."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(int(flag), device=acc.device), reduction="sum").item())


def _gather_rng(acc: Accelerator) -> dict[str, torch.Tensor]:
    """Every rank's RNG state (rank 0 unprefixed, as a single-process checkpoint stores it)."""
    local = capture_rng()
    if acc.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    merged: dict[str, torch.Tensor] = {}
    for rank, states in enumerate(gather_object([local])):
        merged.update({(f"rank{rank}." if rank else "") + k: v for k, v in states.items()})
    return merged


def _optimizer_step(
    loop: Loop, data: LoopData, objective: Objective, window: list[list[int]], scaler: Any
) -> tuple[torch.Tensor | float, int, dict[str, torch.Tensor], int]:
    """One optimizer step over ``window``; each micro-loss is divided by the window's global count.

    The summed loss and statistics come back as device tensors: reading them here would make the host wait
    for the GPU every step; the log reads them once per logged line.

    Dividing every micro-batch by the same global count (not by its own) is what makes the update
    independent of how the batch is split. Across processes the count is summed, and the loss scaled by
    the world size because data-parallel gradient sync averages. A process left without a micro-batch in
    the last window of an epoch still runs one (weighted zero), so gradient sync sees every rank.
    """
    acc = loop.accelerator
    mine = window[acc.process_index :: acc.num_processes]
    weight = 1.0
    if not mine:
        mine, weight = window[:1], 0.0
    micro = [data.collate(indices) for indices in mine]
    local = sum(objective.count(m) for m in micro) if weight else 0
    # one process needs no device round trip (which would wait for the previous step's GPU work)
    window_count = local if acc.num_processes == 1 else int(acc.reduce(torch.tensor(local, device=acc.device), reduction="sum"))
    if window_count == 0:
        return 0.0, 0, {}, 0  # nothing trainable in this window: no update, and nothing logged as loss 0
    loop.module.train()
    summed = torch.zeros((), device=acc.device)
    stats: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro):
        batch = to_device(batch, acc.device)
        last = index == len(micro) - 1
        with acc.no_sync(loop.module) if not last else contextlib.nullcontext():
            with loop.precision.autocast():
                loss_sum, batch_stats = objective.forward(loop.module, batch)
            scaled = loss_sum * (weight * acc.num_processes / window_count)
            acc.backward(scaler.scale(scaled) if scaler is not None else scaled)
        summed += loss_sum.detach() * weight
        for key, value in batch_stats.items():
            stats[key] = stats.get(key, 0.0) + value.detach().float() * weight
    if scaler is not None:
        scaler.unscale_(loop.optimizer)
    acc.clip_grad_norm_(loop.module.parameters(), loop.config.max_grad_norm)
    if scaler is not None:
        scaler.step(loop.optimizer)
        scaler.update()
    else:
        loop.optimizer.step()
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    tokens = sum(real_tokens(m) for m in micro) if weight else 0
    if acc.num_processes > 1:  # log the whole window's loss, not this rank's share
        packed = torch.stack([summed.float(), *[stats[k] for k in sorted(stats)], torch.tensor(float(tokens), device=acc.device)])
        packed = acc.reduce(packed, reduction="sum")
        summed = packed[0]
        stats = {k: packed[1 + i] for i, k in enumerate(sorted(stats))}
        tokens = int(packed[-1])
    return summed, window_count, stats, tokens


class _LogWindow:
    """Count-weighted mean loss and statistics over the steps since the last log line, and throughput."""

    def __init__(self, count_name: str) -> None:
        self.count_name = count_name
        self.total_tokens = 0
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.count, self.tokens, self.since = 0, 0, now
        self.stats: dict[str, torch.Tensor | float] = {}

    def add(self, loss_sum: torch.Tensor | float, count: int, tokens: int, stats: dict[str, torch.Tensor]) -> None:
        """Sums stay on the device until :meth:`flush` (see :func:`_optimizer_step`)."""
        self.loss_sum += loss_sum
        self.count += count
        self.tokens += tokens
        self.total_tokens += tokens
        for key, value in stats.items():
            self.stats[key] = self.stats.get(key, 0.0) + value

    def flush(self, step: int, epoch: int, lr: float) -> dict[str, Any] | None:
        now = time.perf_counter()
        row = None
        if self.count:
            row = {
                "step": step,
                "epoch": epoch,
                "loss": float(self.loss_sum) / self.count,
                "lr": lr,
                "tokens_per_s": round(self.tokens / max(now - self.since, 1e-9), 1),
                self.count_name: self.count,
                **{key: float(value) / self.count for key, value in sorted(self.stats.items())},
            }
        self._reset(now)
        return row
