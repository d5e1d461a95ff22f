"""The run directory shared by every recipe: refusing to clobber a run, the metrics log, resume fingerprints."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.models.trained import ADAPTER_DIR, MODEL_DIR
from tuneloop.registry.records import RECORD_FILE

FINGERPRINT_KEYS = (
    "method",
    "max_seq_len",
    "batch_size",
    "grad_accum",
    "seed",
    "base_model",
    "adapter",
    "lora_r",
    "optimizer",
)


class RunDirectoryError(RuntimeError):
    """The output directory holds another run; nothing is overwritten without being asked."""


def fingerprint(config: RunConfig, token_streams: Iterable[Any], world_size: int = 1) -> str:
    """What must not change between a checkpoint and its resume: the token stream and how it is batched.

    Changed data, sequence length, batch size or number of processes would silently replay other batches
    from the saved position, so resuming with any of them is refused.
    """
    digest = hashlib.sha256()
    for item in token_streams:
        digest.update(json.dumps(item).encode())
    for key in FINGERPRINT_KEYS:
        digest.update(f"{key}={getattr(config, key)}".encode())
    if world_size != 1:
        digest.update(f"world_size={world_size}".encode())
    return digest.hexdigest()


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    has_run = (out / RECORD_FILE).exists() or (out / "checkpoints").exists()
    if has_run and not (resume or overwrite):
        raise RunDirectoryError(
            f"{out} already holds a run; use --resume to continue it, --overwrite to replace it, "
            "or choose another output_dir"
        )
    if overwrite and not resume:
        for name in ("checkpoints", ADAPTER_DIR, MODEL_DIR, "eval", "metrics.jsonl", "tensorboard", RECORD_FILE):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def truncate_metrics(path: Path, after_step: int) -> None:
    """Keep only log lines up to ``after_step``, so a resumed run's curve has no duplicated steps."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if line and json.loads(line)["step"] <= after_step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a line half-written when the process was killed: it and anything after are dropped
    path.write_text("".join(line + "\n" for line in kept))


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
