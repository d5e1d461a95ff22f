"""Evaluation stage: ``run(config) -> EvalResult``; the task registry and metrics live beside it."""

from tuneloop.evaluate.run import EvalResult, run

__all__ = ["EvalResult", "run"]
