"""The trained artefact: weights plus everything needed to use them exactly as they were trained.

``adapter/`` (PEFT methods) or ``model/`` (full fine-tuning) holds safetensors weights, the tokenizer, and
``tuneloop.json``: the chat template text and its hash, the end-of-turn token, the task spec (labels,
system prompt) and the base model. Loading checks the tokenizer's template against the stored hash, so a
template that drifted between training and use fails loudly instead of producing gibberish.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.data.render import ChatFormat
from tuneloop.tasks import TaskSpec
from tuneloop.models.load import DeviceSetup, load_causal_lm, load_tokenizer
from tuneloop.models.source import ModelSource, resolve_model

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
META_FILE = "tuneloop.json"


class ArtifactError(RuntimeError):
    """A trained artefact that is missing, incomplete or inconsistent with its record."""


@dataclass
class TrainedModel:
    """A loaded fine-tune, ready for generation. ``model`` may be a PEFT model (adapter can be disabled)."""

    model: Any
    tokenizer: Any
    chat_format: ChatFormat
    spec: TaskSpec
    base_model: str
    is_adapter: bool


def save_trained_model(
    model: Any, tokenizer: Any, chat_format: ChatFormat, spec: TaskSpec, source: ModelSource, out: Path, method: Any
) -> Path:
    folder = out / (ADAPTER_DIR if method.saves_adapter else MODEL_DIR)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    meta = {
        "base_model": source.name,
        "base_model_origin": source.origin,
        "base_model_sha256": source.origin_sha256,
        "adapter_method": method.name,
        "chat_template": chat_format.template,
        "chat_format": chat_format.as_dict(),
        "task": spec.as_dict(),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def find_artifact(path: Path) -> Path:
    """Accept a run directory or the artefact folder itself."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    for name in (ADAPTER_DIR, MODEL_DIR):
        if (path / name / META_FILE).is_file():
            return path / name
    raise ArtifactError(f"{path}: no trained model here (expected {ADAPTER_DIR}/ or {MODEL_DIR}/ with {META_FILE})")


def load_trained_model(path: Path, setup: DeviceSetup, base_model: str | None = None) -> TrainedModel:
    """Load a run's fine-tune for inference; ``base_model`` overrides where the base weights come from."""
    folder = find_artifact(path)
    meta = json.loads((folder / META_FILE).read_text())
    tokenizer = load_tokenizer(str(folder))
    stored = ChatFormat.from_dict(meta["chat_template"], meta["chat_format"])
    actual = hashlib.sha256((tokenizer.chat_template or "").encode("utf-8")).hexdigest()
    if actual != stored.template_sha256:
        raise ArtifactError(
            f"{folder}: the tokenizer's chat template (sha256 {actual[:12]}) differs from the one the model was "
            f"trained with ({stored.template_sha256[:12]}); refusing to serve a mismatched template"
        )
    is_adapter = (folder / "adapter_config.json").is_file()
    if is_adapter:
        from peft import PeftModel

        if not (folder / "adapter_model.safetensors").is_file():
            raise ArtifactError(f"{folder}: adapter weights must be adapter_model.safetensors (pickles are refused)")
        base = load_causal_lm(resolve_model(base_model or meta["base_model"]), setup.dtype, setup.device)
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    else:
        model = load_causal_lm(str(folder), setup.dtype, setup.device)
    model.eval()
    return TrainedModel(model, tokenizer, stored, TaskSpec.from_dict(meta["task"]), meta["base_model"], is_adapter)
