"""Supervised fine-tuning, as one recipe you can read top to bottom.

``run(config)``: processes and device -> the run directory -> data -> model + adapter -> optimizer and
schedule -> the shared loop (:mod:`tuneloop.train.loop`: accumulation normalised by trained tokens,
validation, early stopping, checkpoints, exact resume) -> the adapter, its chat format and the run record.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
from accelerate import Accelerator

from tuneloop.adapters import get_adapter_method
from tuneloop.config import RunConfig, dump_config
from tuneloop.data import ChatRenderer, EncodedExample, encode_dataset
from tuneloop.data.audit import require_no_leakage
from tuneloop.models import load_tokenizer, resolve_model
from tuneloop.registry import write_json_atomic
from tuneloop.train.batching import epoch_batches, to_device, trained_tokens
from tuneloop.train.fast.attention import packed_attention
from tuneloop.train.fast.casting import adapter_inputs_in_autocast_dtype
from tuneloop.train.fast.fused import fused_layers_for
from tuneloop.train.fast.graphs import PackedStepGraphs, plan_buckets, plan_step_graphs
from tuneloop.train.fast.packing import RowBuckets, batch_collator
from tuneloop.train.loop import Loop, LoopData, Objective, run_loop
from tuneloop.train.loss import TrainedTokenLoss
from tuneloop.train.observer import TrainObserver
from tuneloop.train.prepare import load_split, prepare_data
from tuneloop.train.rundir import RunDirectoryError, fingerprint
from tuneloop.train.setup import (
    MixedPrecision,
    TrainResult,
    artifact_saver,
    build_model,
    build_optimization,
    finish,
    start,
    tracked,
)

__all__ = ["RunDirectoryError", "TrainResult", "run"]


def run(
    config: RunConfig, *, resume: bool = False, overwrite: bool = False, observer: TrainObserver | None = None
) -> TrainResult:
    phases = _PhaseClock()  # where a run's seconds go before its first step (record.json: startup_seconds)
    accelerator, setup, precision, out = start(config, resume=resume, overwrite=overwrite)
    method = get_adapter_method(config.adapter)

    # --- data: rows -> conversations -> token ids with completion-only labels -----------------------------
    with accelerator.main_process_first():  # a GGUF base is converted once, by the main process
        source = resolve_model(config.base_model)
    tokenizer = load_tokenizer(source)
    renderer = ChatRenderer(tokenizer)
    phases.mark("start_and_tokenizer")
    data = prepare_data(config)
    if not config.allow_data_leakage:
        test = load_split(config, config.test_file, data.spec)
        require_no_leakage(data.train, {"validation": data.validation, "test": test})
    phases.mark("data_read")
    train_set, train_report = encode_dataset(renderer, data.train, config.max_seq_len, config.truncation)
    val_set, val_report = encode_dataset(renderer, data.validation, config.max_seq_len, config.truncation)
    phases.mark("data_encode")
    if not train_set:
        raise ValueError(f"{config.train_file}: every training example was dropped as too long")
    if accelerator.is_main_process:
        (out / "config.yaml").write_text(dump_config(config))
        write_json_atomic(out / "data_report.json", {"train": train_report.as_dict(), "validation": val_report.as_dict()})

    # --- model: base weights (quantized for QLoRA), then the adapter method's wrapping ----------------------
    model, fast_path = build_model(config, method, source, setup)
    phases.mark("model")
    batches_per_epoch = math.ceil(len(train_set) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / (config.grad_accum * accelerator.num_processes))
    optimizer, scheduler = build_optimization(config, model, setup.device, steps_per_epoch, processes=accelerator.num_processes)
    # the scheduler stays unprepared: accelerate would step it once per process, our steps already count them
    loss_module = TrainedTokenLoss(model, compiled=fast_path.kernels == "compile")
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    phases.mark("optimizer")

    # --- the loop: same data order, optimizer, scheduler and RNG whether resumed or not --------------------
    # packing changes the layout of a batch (one row, no padding), never which examples form it; under CUDA
    # graphs each row is padded up to one of a few lengths, with padding that takes no part in the loss
    use_graphs, why = plan_step_graphs(config, setup.device, accelerator.num_processes, fast_path.kernels, fast_path.offload)
    graphs, buckets = None, None
    if why:
        fast_path = replace(fast_path, cuda_graphs=use_graphs, reasons=(*fast_path.reasons, why))
    if use_graphs:
        graphs = PackedStepGraphs(loss_module, autocast_dtype=precision.autocast_dtype)
        rows = [
            sum(len(train_set[i].input_ids) for i in batch)
            for epoch in range(config.epochs)
            for batch in epoch_batches(train_set, config.batch_size, config.seed, epoch)
        ]
        buckets = RowBuckets(plan_buckets(rows, config.max_seq_len), config.max_seq_len, tokenizer.pad_token_id)
    # one bound for every batch: no recompiles; validation is never graphed, so its rows keep their lengths
    make_batch = batch_collator(config.packing, tokenizer.pad_token_id, config.max_seq_len, buckets)
    make_val_batch = batch_collator(config.packing, tokenizer.pad_token_id, config.max_seq_len)
    loop_data = LoopData(
        epoch_batches=lambda epoch: epoch_batches(train_set, config.batch_size, config.seed, epoch),
        collate=lambda indices: make_batch([train_set[i] for i in indices]),
        validate=lambda: {"val_loss": _validation_loss(accelerator, precision, loss_module, val_set, config.eval_batch_size, make_val_batch)},
        steps_per_epoch=steps_per_epoch,
    )
    step_loss = graphs if graphs is not None else lambda module, batch: module(**batch)[0]
    objective = Objective(count=trained_tokens, forward=lambda module, batch: (step_loss(module, batch), {}))
    stream = ([e.input_ids, e.labels] for e in train_set)
    attention = packed_attention(model) if config.packing else nullcontext()
    casting = adapter_inputs_in_autocast_dtype(model, autocast_dtype=precision.autocast_dtype, dora=method.use_dora)
    fused = fused_layers_for(model, fast_path.kernels)
    track = tracked(config, out, observer, accelerator, resume, fast_path)
    with fused as fused_counts, track as tracked_observer, attention, casting:
        loop = Loop(
            config, out, accelerator, loss_module, model, optimizer, scheduler, tracked_observer,
            fingerprint(config, stream, accelerator.num_processes), precision,
        )  # fmt: skip
        result = run_loop(loop, loop_data, objective, resume=resume)

    # --- artefacts: the trained weights with the chat format and task they were trained for ----------------
    save = artifact_saver(tokenizer, renderer.format, data.spec, source, out, method)
    extra = {
        "chat_format": renderer.format.as_dict(),
        "task": data.spec.as_dict(),
        "startup_seconds": phases.seconds,
        "fused_layers": fused_counts,
    }
    if graphs is not None:
        extra["cuda_graphs"] = graphs.summary()
    return finish("sft", config, out, accelerator, model, save, result, setup, source, extra, fast_path)


class _PhaseClock:
    """Seconds of each set-up phase, from the call of :func:`run` to the loop. Issue 7 (c): on the H200 a third
    of ``tuneloop train``'s wall time went before the first step; a run says where, so a bench row can tell
    imports and process start (the wall time less these and the loop) from data, model load and compile probe."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now


@torch.no_grad()
def _validation_loss(
    accelerator: Accelerator,
    precision: MixedPrecision,
    loss_module: torch.nn.Module,
    examples: list[EncodedExample],
    batch_size: int,
    make_batch: Callable[[Sequence[EncodedExample]], dict[str, Any]],
) -> float | None:
    """Mean loss per trained token over the validation set (``None`` without one)."""
    if not examples:
        return None
    loss_module.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for first in range(0, len(order), batch_size):
        batch = make_batch([examples[i] for i in order[first : first + batch_size]])
        with precision.autocast():
            loss_sum, tokens = loss_module(**to_device(batch, accelerator.device))
        total += float(loss_sum)
        count += int(tokens)
    return total / count if count else None
