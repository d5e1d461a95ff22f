"""Atomic, pickle-free checkpoints that a resumed run can trust.

A checkpoint is written into a hidden temporary folder, every file fsynced, a ``COMPLETE`` marker written
last, then the folder renamed to ``step-N``. A kill at any moment leaves either a complete checkpoint or a
temporary folder that :func:`latest_checkpoint` ignores. Tensors go to safetensors, everything else to JSON:
nothing is ever unpickled on resume.

Under several processes every rank calls :func:`save_checkpoint` (sharded FSDP2 tensors are gathered, a
collective every rank must join) and only the ``writer`` touches the disk; each rank's RNG state is stored
under its own prefix so dropout continues per rank.
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
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: every rank must call it), or the tensor itself."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``target``: sharded the same way when ``target`` is an FSDP2 DTensor."""
    mesh = getattr(target, "device_mesh", None)
    if mesh is None:
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(target.dtype), mesh, target.placements)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: _full(p.detach()).cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def capture_rng() -> dict[str, torch.Tensor]:
    """This process's torch (and CUDA) RNG state."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


NEST = "/"  # joins the keys of nested optimizer state (bitsandbytes wraps its quantization state in a dict)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}{NEST}"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *outer, last = key.split(NEST)
        target = nested
        for part in outer:
            target = target.setdefault(part, {})
        target[last] = value
    return nested


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in _flatten(values).items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = _full(value.detach()).cpu().contiguous()
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
    *,
    protect_step: int | None = None,
    writer: bool = True,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``folder/step-N`` atomically and prune to the newest ``keep`` complete checkpoints.

    ``protect_step``: a checkpoint never pruned (the best one, for best-checkpoint selection).
    ``writer``: whether this process writes (all ranks gather, rank 0 writes). ``rng``: RNG states to store,
    default this process's.
    """
    final = folder / f"{PREFIX}{state.step}"
    weights = trainable_state(model)
    optimizer_tensors, optimizer_meta = _optimizer_tensors(optimizer)
    if not writer:
        return final
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".tmp-{PREFIX}{state.step}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    save_file(weights, staging / "trainable.safetensors")
    save_file(optimizer_tensors, staging / "optimizer.safetensors")
    save_file(rng if rng is not None else capture_rng(), staging / "rng.safetensors")
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
        if old.name != f"{PREFIX}{protect_step}":
            shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a process killed mid-write
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


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Copy a checkpoint's trained weights into ``model`` (resume, or picking the best checkpoint)."""
    weights = load_file(path / "trainable.safetensors")
    parameters = dict(model.named_parameters())
    missing = [name for name in weights if name not in parameters]
    if missing:
        raise ValueError(f"{path}: checkpoint has parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            target = parameters[name]
            target.copy_(_like(tensor.to(target.device), target))


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *, rank: int = 0
) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG in place; return where training stood."""
    meta = json.loads((path / "state.json").read_text())
    load_weights(path, model)
    optimizer_tensors = load_file(path / "optimizer.safetensors")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in optimizer_tensors.items():
        index, name = key.split(".", 1)
        param = params[int(index)] if int(index) < len(params) else None
        if param is not None and getattr(param, "device_mesh", None) is not None and tensor.dim() > 0:
            tensor = _like(tensor.to(param.device), param)  # FSDP2: moments are sharded like their parameter
        state.setdefault(int(index), {})[name] = tensor
    for index, values in meta["optimizer"]["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    state = {index: _nest(values) for index, values in state.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(path / "rng.safetensors")
    rng = _rng_of_rank(rng, rank)
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return TrainerState(**meta["trainer"])


def _rng_of_rank(rng: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank 0's states are stored unprefixed (a single-process checkpoint), rank r's as ``rank{r}.*``."""
    prefix = f"rank{rank}."
    if rank and f"{prefix}torch" in rng:
        return {k.removeprefix(prefix): v for k, v in rng.items() if k.startswith(prefix)}
    return {k: v for k, v in rng.items() if not k.startswith("rank")}


def _json_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
