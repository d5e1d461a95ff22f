"""What every recipe sets up the same way: processes and device, the model with its adapter, the optimizer
and schedule, the tracked observer, and the artefact with its record at the end.

Kept out of the recipes so ``sft.py`` and ``dpo.py`` read as the steps that make them different.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

from tuneloop.adapters import AdapterMethod
from tuneloop.adapters.loading import load_base_model
from tuneloop.config import RunConfig
from tuneloop.models import DeviceSetup, ModelSource, pick_device
from tuneloop.models.trained import save_trained_model
from tuneloop.registry import file_fingerprint, software_versions, write_json_atomic
from tuneloop.registry.records import RECORD_FILE
from tuneloop.train.checkpoint import PREFIX, latest_checkpoint, trainable_state
from tuneloop.train.estimate import micro_batch_tokens
from tuneloop.train.fast import FastPathReport, apply_fast_path
from tuneloop.train.loop import LoopResult, total_steps
from tuneloop.train.observer import SilentObserver, TrainObserver
from tuneloop.train.optim import build_optimizer
from tuneloop.train.rundir import prepare_output_dir
from tuneloop.train.tracking import TrackingObserver, open_backends


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
    stopped_early: bool = False
    best_checkpoint: Path | None = None
    validation: dict[str, Any] | None = None
    fast_path: dict[str, Any] | None = None  # FastPathReport.as_dict(): kernels, checkpointed layers, predicted peak


@dataclass(frozen=True)
class MixedPrecision:
    """Autocast, and loss scaling for fp16, held by the run instead of by accelerate.

    accelerate keeps its mixed-precision setting in a process-wide singleton and refuses a second run in the
    same process with another precision (a bf16 run, then an fp32 one: tests, notebooks, sweeps). The run
    owns its autocast instead, and accelerate only distributes.
    """

    device_type: str
    dtype: torch.dtype

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype forward passes autocast to, or ``None`` for an fp32 run (no autocast)."""
        return self.dtype if self.dtype in (torch.bfloat16, torch.float16) else None

    def autocast(self) -> Any:
        if self.autocast_dtype is not None:
            return torch.autocast(self.device_type, dtype=self.autocast_dtype)
        return nullcontext()

    def grad_scaler(self) -> Any:
        """fp16 needs its loss scaled against underflow; bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.device_type) if self.dtype == torch.float16 else None


def start(
    config: RunConfig, *, resume: bool, overwrite: bool
) -> tuple[Accelerator, DeviceSetup, MixedPrecision, Path]:
    """Processes and device, the run directory, the seed: what every recipe does before it reads data.

    The accelerator first: under ``accelerate launch`` it picks this process's GPU, which the model needs.
    The main process prepares the output directory (refusing to clobber a finished run unless told) and the
    others wait for it; then every process seeds the same way.
    """
    wanted = pick_device(config.precision)
    accelerator = Accelerator(
        mixed_precision="no",  # see MixedPrecision
        cpu=wanted.device.type == "cpu",
        device_placement=False,  # models are loaded onto the device (a 4-bit model must not be moved again)
    )
    setup = DeviceSetup(accelerator.device, wanted.dtype)
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        prepare_output_dir(out, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    return accelerator, setup, MixedPrecision(setup.device.type, setup.dtype), out


def build_model(
    config: RunConfig, method: AdapterMethod, source: ModelSource, setup: DeviceSetup, *, keep_peft_layers: bool = False
) -> tuple[Any, FastPathReport]:
    """Base weights (quantized when the method says so), the method's wrapping, then the fast path.

    The fast path (:func:`tuneloop.train.fast.apply_fast_path`) sets which decoder layers are checkpointed
    (``gradient_checkpointing``: all, none, or as many as ``memory_budget_gib`` needs) and compiles the
    layers (``kernels``); its report says what it did. ``keep_peft_layers``: see ``apply_fast_path``.
    ``gradient_checkpointing: true`` is also switched on before the wrapping, as it always was, so PEFT prepares
    the model for it the same way.
    """
    weights_dtype = torch.float32 if method.master_weights_fp32 else setup.dtype
    base = load_base_model(source, method, weights_dtype, setup.device)
    if config.gradient_checkpointing is True:
        enable_gradient_checkpointing(base)
    model = method.apply(base, config)
    report = apply_fast_path(
        model,
        config,
        device=setup.device,
        tokens_per_micro_batch=micro_batch_tokens(config),
        autocast_dtype=MixedPrecision(setup.device.type, setup.dtype).autocast_dtype,
        keep_peft_layers=keep_peft_layers,
    )
    return model, report


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant checkpointing: it needs no inputs that require grad, so frozen embeddings stay frozen."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def build_optimization(
    config: RunConfig, model: Any, device: torch.device, steps_per_epoch: int, *, processes: int = 1
) -> tuple[Any, Any]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        config.optimizer, trainable, lr=config.learning_rate, weight_decay=config.weight_decay, device=device,
        single_process=processes == 1,
    )  # fmt: skip
    steps = total_steps(config, steps_per_epoch)
    scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=round(config.warmup_ratio * steps), num_training_steps=steps
    )
    return optimizer, scheduler


@contextmanager
def tracked(
    config: RunConfig,
    out: Path,
    observer: TrainObserver | None,
    accelerator: Accelerator,
    resume: bool,
    fast_path: FastPathReport | None = None,
) -> Iterator[TrainObserver]:
    """The caller's observer plus experiment trackers on the main process; others stay silent.

    The fast path's report is announced first, so the console shows which layers are checkpointed and
    whether they are compiled before the first step.
    """
    if not accelerator.is_main_process:
        yield SilentObserver()
        return
    last = latest_checkpoint(out / "checkpoints") if resume else None
    purge = int(last.name.removeprefix(PREFIX)) + 1 if last is not None else None
    tracking = TrackingObserver(observer or SilentObserver(), open_backends(config, out, purge))
    if fast_path is not None:
        tracking.on_fast_path(fast_path)
    try:
        yield tracking
    finally:
        tracking.close()


def finish(
    kind: str,
    config: RunConfig,
    out: Path,
    accelerator: Accelerator,
    model: Any,
    save_artifact: Any,
    loop: LoopResult,
    setup: DeviceSetup,
    source: ModelSource,
    record_extra: dict[str, Any],
    fast_path: FastPathReport | None = None,
) -> TrainResult:
    """Write the artefact (main process) and the run record; every process returns the same result."""
    accelerator.wait_for_everyone()
    target = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:  # FSDP2 shards: every process gathers, the main process writes
        target = _GatheredWeights(target, trainable_state(target))
    artifact = save_artifact(target) if accelerator.is_main_process else out
    artifact_bytes = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file()) if artifact != out else 0
    val_loss = loop.last_validation.get("val_loss")
    summary = {
        "steps": loop.state.step,
        "epochs": loop.state.epoch,
        "final_loss": loop.last_loss,
        "val_loss": val_loss,
        "validation": loop.last_validation,
        "train_seconds": round(loop.seconds, 2),
        "tokens_per_second": round(loop.tokens / loop.seconds, 1) if loop.seconds > 0 else 0.0,
        "artifact_bytes": artifact_bytes,
        "device": setup.name,
        "processes": accelerator.num_processes,
        "stopped_early": loop.state.stopped_early,
        "best_step": loop.state.best_step,
        "artifact_from_checkpoint": str(loop.restored_best) if loop.restored_best else None,
        "fast_path": fast_path.as_dict() if fast_path is not None else None,
    }
    if torch.cuda.is_available():
        summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if accelerator.is_main_process:
        write_json_atomic(
            out / RECORD_FILE,
            {
                "kind": kind,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "config": config.model_dump(mode="json"),
                "base_model": {"name": source.name, "origin": source.origin, "origin_sha256": source.origin_sha256},
                "inputs": {
                    "train": file_fingerprint(config.train_file),
                    "validation": file_fingerprint(config.validation_file),
                },
                **record_extra,
                "artifact": artifact.name,
                "versions": software_versions(),
                "train": summary,
                "resumed_from": str(loop.resumed_from) if loop.resumed_from else None,
                "parent": None,
            },
        )
    accelerator.wait_for_everyone()  # no process leaves (and tears down its connections) while one still writes
    return TrainResult(
        output_dir=out,
        artifact_dir=artifact,
        steps=loop.state.step,
        epochs=loop.state.epoch,
        final_loss=loop.last_loss,
        val_loss=val_loss,
        train_seconds=loop.seconds,
        tokens_per_second=summary["tokens_per_second"],
        artifact_bytes=artifact_bytes,
        resumed_from=loop.resumed_from,
        stopped_early=loop.state.stopped_early,
        best_checkpoint=loop.restored_best,
        validation=dict(loop.last_validation),
        fast_path=summary["fast_path"],
    )


def artifact_saver(tokenizer: Any, chat_format: Any, spec: Any, source: ModelSource, out: Path, method: AdapterMethod) -> Any:
    def save(model: Any) -> Path:
        return save_trained_model(model, tokenizer, chat_format, spec, source, out, method)

    return save


class _GatheredWeights:
    """A model whose ``save_pretrained`` writes trained weights gathered from every process.

    Under FSDP2 each process holds a shard; the gathered tensors are handed to ``save_pretrained`` as its
    ``state_dict`` (PEFT keeps the adapter keys of it), so the artefact is the same as on one GPU.
    """

    def __init__(self, model: Any, state: dict[str, torch.Tensor]) -> None:
        self.model = model
        self.state = state

    def save_pretrained(self, folder: Any, **kwargs: Any) -> Any:
        return self.model.save_pretrained(folder, state_dict=self.state, **kwargs)
