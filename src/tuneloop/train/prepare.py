"""Shared set-up of a run's data: load, validate, frame for the task, render with the chat template.

Training and evaluation both go through here, so the prompt the model is trained on and the prompt it is
evaluated (and later served) with come from one code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuneloop.config.schema import RunConfig
from tuneloop.data import Conversation, ShapeOptions, load_conversations
from tuneloop.tasks import TaskSpec, get_task


@dataclass(frozen=True)
class PreparedData:
    spec: TaskSpec
    train: list[Conversation]
    validation: list[Conversation]


def load_split(config: RunConfig, path: Path | None, spec: TaskSpec | None) -> list[Conversation]:
    if path is None:
        return []
    options = ShapeOptions(config.text_column, config.label_column)
    conversations = load_conversations(path, options)
    if spec is None:
        return conversations
    return [c.with_system_prompt(spec.system_prompt) for c in conversations]


def prepare_data(config: RunConfig) -> PreparedData:
    """Read train/validation files and derive the task spec (labels, system prompt) from training data."""
    raw_train = load_split(config, config.train_file, None)
    spec = get_task(config.task).make_spec(raw_train, config.labels, config.system_prompt)
    train = [c.with_system_prompt(spec.system_prompt) for c in raw_train]
    return PreparedData(spec, train, load_split(config, config.validation_file, spec))
