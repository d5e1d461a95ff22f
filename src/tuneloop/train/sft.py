"""Supervised fine-tuning, as one recipe you can read top to bottom.

``run(config)``: prepare the run directory -> data -> model + adapter -> optimizer and schedule -> the loop
(gradient accumulation normalised by trained tokens, logging, validation and a checkpoint each epoch) ->
the adapter, its chat format and the run record on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

from tuneloop.adapters import get_adapter_method
from tuneloop.config import RunConfig, dump_config
from tuneloop.data import ChatRenderer, EncodedExample, encode_dataset
from tuneloop.data.audit import require_no_leakage
from tuneloop.models import load_causal_lm, load_tokenizer, pick_device, resolve_model
from tuneloop.registry import file_fingerprint, software_versions, write_json_atomic
from tuneloop.registry.records import RECORD_FILE
from tuneloop.models.trained import ADAPTER_DIR, MODEL_DIR, save_trained_model
from tuneloop.train.batching import collate, epoch_batches, trained_tokens
from tuneloop.train.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from tuneloop.train.loss import TrainedTokenLoss
from tuneloop.train.observer import SilentObserver, TrainObserver
from tuneloop.train.prepare import load_split, prepare_data


class RunDirectoryError(RuntimeError):
    """The output directory holds another run; nothing is overwritten without being asked."""


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    artifact_dir: Path
    steps: int
    epochs: int
    final_loss: float | None
    val_loss: float | None
    train_seconds: float
    tokens_per_second: float
    artifact_bytes: int
    resumed_from: Path | None


def run(
    config: RunConfig, *, resume: bool = False, overwrite: bool = False, observer: TrainObserver | None = None
) -> TrainResult:
    observer = observer or SilentObserver()
    out = Path(config.output_dir)
    _prepare_output_dir(out, resume=resume, overwrite=overwrite)
    set_seed(config.seed)
    setup = pick_device(config.precision)
    method = get_adapter_method(config.adapter)

    # --- data: rows -> conversations -> token ids with completion-only labels -----------------------------
    source = resolve_model(config.base_model)
    tokenizer = load_tokenizer(source)
    renderer = ChatRenderer(tokenizer)
    data = prepare_data(config)
    if not config.allow_data_leakage:
        test = load_split(config, config.test_file, data.spec)
        require_no_leakage(data.train, {"validation": data.validation, "test": test})
    train_set, train_report = encode_dataset(renderer, data.train, config.max_seq_len, config.truncation)
    val_set, val_report = encode_dataset(renderer, data.validation, config.max_seq_len, config.truncation)
    if not train_set:
        raise ValueError(f"{config.train_file}: every training example was dropped as too long")
    (out / "config.yaml").write_text(dump_config(config))
    write_json_atomic(out / "data_report.json", {"train": train_report.as_dict(), "validation": val_report.as_dict()})

    # --- model: base weights, then the adapter method's wrapping ------------------------------------------
    weights_dtype = torch.float32 if method.master_weights_fp32 else setup.dtype
    model = method.apply(load_causal_lm(source, weights_dtype, setup.device), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / config.batch_size) / config.grad_accum)
    total_steps = min(config.epochs * steps_per_epoch, config.max_steps or math.inf)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=round(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    accelerator = Accelerator(
        mixed_precision={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(setup.dtype, "no"),
        cpu=setup.device.type == "cpu",
    )
    loss_module, optimizer, scheduler = accelerator.prepare(TrainedTokenLoss(model), optimizer, scheduler)

    # --- resume: same data, same order, same optimizer, scheduler and RNG ---------------------------------
    state = TrainerState(step=0, epoch=0, batches_done_in_epoch=0, fingerprint=_fingerprint(config, train_set))
    checkpoints = out / "checkpoints"
    resumed_from = latest_checkpoint(checkpoints) if resume else None
    if resumed_from is not None:
        saved = load_checkpoint(resumed_from, model, optimizer, scheduler)
        if saved.fingerprint != state.fingerprint:
            raise RunDirectoryError(
                f"{resumed_from}: checkpoint was made with other data, sequence length, batch size or seed; "
                "resume needs the same inputs (start a new output_dir to train on changed data)"
            )
        state = saved
    metrics_path = out / "metrics.jsonl"
    _truncate_metrics(metrics_path, after_step=state.step)

    # --- the loop -----------------------------------------------------------------------------------------
    observer.on_train_start(total_steps, state.step)
    started = time.perf_counter()
    window = _LogWindow()
    last_loss: float | None = None
    val_loss: float | None = None
    for epoch in range(state.epoch, config.epochs):
        batches = epoch_batches(train_set, config.batch_size, config.seed, epoch)
        first = state.batches_done_in_epoch if epoch == state.epoch else 0
        for start in range(first, len(batches), config.grad_accum):
            if state.step >= total_steps:
                break
            micro = [collate([train_set[i] for i in b], tokenizer.pad_token_id) for b in batches[start : start + config.grad_accum]]
            loss_sum, tokens = _optimizer_step(accelerator, loss_module, optimizer, scheduler, micro, config)
            state = replace(state, step=state.step + 1, epoch=epoch, batches_done_in_epoch=start + len(micro))
            window.add(loss_sum, tokens, sum(int(m["attention_mask"].sum()) for m in micro))
            if state.step % config.logging_steps == 0 or state.step == total_steps:
                row = window.flush(state.step, epoch, scheduler.get_last_lr()[0])
                if row is not None:
                    last_loss = row["loss"]
                    _append_jsonl(metrics_path, row)
                    observer.on_step(state.step, row)
            if config.save_every_steps and state.step % config.save_every_steps == 0:
                save_checkpoint(checkpoints, state, model, optimizer, scheduler, config.keep_checkpoints)
        else:
            state = replace(state, epoch=epoch + 1, batches_done_in_epoch=0)
            val_loss = _validation_loss(accelerator, loss_module, val_set, config, tokenizer.pad_token_id)
            epoch_row = {"step": state.step, "epoch": epoch + 1, "val_loss": val_loss}
            _append_jsonl(metrics_path, epoch_row)
            observer.on_epoch_end(epoch + 1, epoch_row)
            save_checkpoint(checkpoints, state, model, optimizer, scheduler, config.keep_checkpoints)
            continue
        break  # max_steps reached inside the epoch
    seconds = time.perf_counter() - started
    observer.on_train_end()

    # --- artefacts: the trained weights with the chat format and task they were trained for ----------------
    artifact = save_trained_model(
        accelerator.unwrap_model(loss_module).model, tokenizer, renderer.format, data.spec, source, out, method
    )
    artifact_bytes = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
    summary = {
        "steps": state.step,
        "epochs": state.epoch,
        "final_loss": last_loss,
        "val_loss": val_loss,
        "train_seconds": round(seconds, 2),
        "tokens_per_second": round(window.total_tokens / seconds, 1) if seconds > 0 else 0.0,
        "artifact_bytes": artifact_bytes,
        "device": setup.name,
    }
    write_json_atomic(
        out / RECORD_FILE,
        {
            "kind": "sft",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": config.model_dump(mode="json"),
            "base_model": {"name": source.name, "origin": source.origin, "origin_sha256": source.origin_sha256},
            "inputs": {
                "train": file_fingerprint(config.train_file),
                "validation": file_fingerprint(config.validation_file),
            },
            "chat_format": renderer.format.as_dict(),
            "task": data.spec.as_dict(),
            "artifact": artifact.name,
            "versions": software_versions(),
            "train": summary,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "parent": None,
        },
    )
    return TrainResult(
        output_dir=out,
        artifact_dir=artifact,
        steps=state.step,
        epochs=state.epoch,
        final_loss=last_loss,
        val_loss=val_loss,
        train_seconds=seconds,
        tokens_per_second=summary["tokens_per_second"],
        artifact_bytes=artifact_bytes,
        resumed_from=resumed_from,
    )


def _optimizer_step(
    accelerator: Accelerator,
    loss_module: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    micro_batches: list[dict[str, torch.Tensor]],
    config: RunConfig,
) -> tuple[float, int]:
    """One optimizer step over ``micro_batches``; each micro-loss is divided by the window's trained tokens.

    Dividing every micro-batch by the same global count (not by its own) is what makes the update
    independent of how the batch is split. Across processes the count is summed, and the loss scaled by
    the world size because data-parallel gradient sync averages.
    """
    local = torch.tensor(sum(trained_tokens(m) for m in micro_batches), device=accelerator.device)
    window_tokens = int(accelerator.reduce(local, reduction="sum"))
    if window_tokens == 0:
        return 0.0, 0  # nothing trainable in this window: no update, and nothing logged as loss 0
    loss_module.train()
    summed = 0.0
    for index, batch in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        last = index == len(micro_batches) - 1
        with accelerator.no_sync(loss_module) if not last else contextlib.nullcontext():
            loss_sum, _ = loss_module(**batch)
            accelerator.backward(loss_sum * accelerator.num_processes / window_tokens)
        summed += float(loss_sum.detach())
    accelerator.clip_grad_norm_(loss_module.parameters(), config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return summed, int(local)


@torch.no_grad()
def _validation_loss(
    accelerator: Accelerator, loss_module: torch.nn.Module, examples: list[EncodedExample], config: RunConfig, pad_id: int
) -> float | None:
    """Mean loss per trained token over the validation set (``None`` without one)."""
    if not examples:
        return None
    loss_module.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), config.eval_batch_size):
        batch = collate([examples[i] for i in order[start : start + config.eval_batch_size]], pad_id)
        loss_sum, tokens = loss_module(**{k: v.to(accelerator.device) for k, v in batch.items()})
        total += float(loss_sum)
        count += int(tokens)
    return total / count if count else None


class _LogWindow:
    """Token-weighted mean loss over the steps since the last log line, and throughput."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.trained = 0
        self.tokens = 0
        self.total_tokens = 0
        self.since = time.perf_counter()

    def add(self, loss_sum: float, trained: int, tokens: int) -> None:
        self.loss_sum += loss_sum
        self.trained += trained
        self.tokens += tokens
        self.total_tokens += tokens

    def flush(self, step: int, epoch: int, lr: float) -> dict[str, Any] | None:
        now = time.perf_counter()
        row = None
        if self.trained:
            row = {
                "step": step,
                "epoch": epoch,
                "loss": self.loss_sum / self.trained,
                "lr": lr,
                "tokens_per_s": round(self.tokens / max(now - self.since, 1e-9), 1),
                "trained_tokens": self.trained,
            }
        self.loss_sum, self.trained, self.tokens, self.since = 0.0, 0, 0, now
        return row


def _fingerprint(config: RunConfig, train_set: list[EncodedExample]) -> str:
    """What must not change between a checkpoint and its resume: the token stream and how it is batched."""
    digest = hashlib.sha256()
    for example in train_set:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
    for key in ("max_seq_len", "batch_size", "grad_accum", "seed", "base_model", "adapter", "lora_r"):
        digest.update(f"{key}={getattr(config, key)}".encode())
    return digest.hexdigest()


def _prepare_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    has_run = (out / RECORD_FILE).exists() or (out / "checkpoints").exists()
    if has_run and not (resume or overwrite):
        raise RunDirectoryError(
            f"{out} already holds a run; use --resume to continue it, --overwrite to replace it, "
            "or choose another output_dir"
        )
    if overwrite and not resume:
        for name in ("checkpoints", ADAPTER_DIR, MODEL_DIR, "eval", "metrics.jsonl", RECORD_FILE):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _truncate_metrics(path: Path, after_step: int) -> None:
    """Keep only log lines up to ``after_step``, so a resumed run's curve has no duplicated steps."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")

