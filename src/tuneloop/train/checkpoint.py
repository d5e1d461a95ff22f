"""Atomic, pickle-free checkpoints that a resumed run can trust.

A checkpoint is written into a hidden temporary folder, every file fsynced, a ``COMPLETE`` marker written
last, then the folder renamed to ``step-N``. A kill at any moment leaves either a complete checkpoint or a
temporary folder that :func:`latest_checkpoint` ignores. Tensors go to safetensors, everything else to JSON:
nothing is ever unpickled on resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

COMPLETE_MARKER = "COMPLETE"
PREFIX = "step-"


@dataclass(frozen=True)
class TrainerState:
    """Where training stood: enough to replay the same batches in the same order from here."""

    step: int
    epoch: int
    batches_done_in_epoch: int
    fingerprint: str
    best_val_loss: float | None = None


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    folder: Path,
    state: TrainerState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
) -> Path:
    """Write ``folder/step-N`` atomically and prune to the newest ``keep`` complete checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{state.step}"
    staging = folder / f".tmp-{PREFIX}{state.step}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    save_file(trainable_state(model), staging / "trainable.safetensors")
    optimizer_tensors, optimizer_meta = _optimizer_tensors(optimizer)
    save_file(optimizer_tensors, staging / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, staging / "rng.safetensors")
    meta = {
        "trainer": asdict(state),
        "optimizer": optimizer_meta,
        "scheduler": scheduler.state_dict(),
        "python_random": _json_random_state(),
    }
    (staging / "state.json").write_text(json.dumps(meta, indent=1))
    for path in staging.iterdir():
        _fsync_file(path)
    (staging / COMPLETE_MARKER).write_text("ok\n")
    _fsync_file(staging / COMPLETE_MARKER)
    _fsync_dir(staging)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    _fsync_dir(folder)
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first; partial or temporary folders are never listed."""
    if not folder.is_dir():
        return []
    found = [
        path
        for path in folder.iterdir()
        if path.is_dir() and path.name.startswith(PREFIX) and (path / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest_checkpoint(folder: Path) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG in place; return where training stood."""
    meta = json.loads((path / "state.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    parameters = dict(model.named_parameters())
    missing = [name for name in weights if name not in parameters]
    if missing:
        raise ValueError(f"{path}: checkpoint has parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            parameters[name].copy_(tensor)
    optimizer_tensors = load_file(path / "optimizer.safetensors")
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in optimizer_tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in meta["optimizer"]["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return TrainerState(**meta["trainer"])


def _json_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
