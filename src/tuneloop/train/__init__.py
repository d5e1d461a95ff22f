"""Training stage: ``run(config) -> TrainResult`` (supervised fine-tuning recipe)."""

from tuneloop.train.sft import RunDirectoryError, TrainResult, run

__all__ = ["RunDirectoryError", "TrainResult", "run"]
