"""Training stage: ``run(config) -> TrainResult``, dispatched on ``config.method`` (``sft``, ``dpo``)."""

from __future__ import annotations

from typing import Any

from tuneloop.config import RunConfig
from tuneloop.train.preempt import Preempted
from tuneloop.train.recipes import RECIPES, get_recipe
from tuneloop.train.rundir import RunDirectoryError
from tuneloop.train.setup import TrainResult


def run(config: RunConfig, **options: Any) -> TrainResult:
    """Train with the recipe ``config.method`` names (``resume``, ``overwrite``, ``observer`` pass through)."""
    return get_recipe(config.method).load()(config, **options)


__all__ = ["RECIPES", "Preempted", "RunDirectoryError", "TrainResult", "run"]
