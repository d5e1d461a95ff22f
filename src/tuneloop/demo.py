"""The demo: the bundled support-triage example, trained and evaluated end to end on the embedded model."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tuneloop import evaluate, train
from tuneloop.config import RunConfig, load_config
from tuneloop.evaluate.run import EvalResult, ProgressCallback
from tuneloop.train.observer import TrainObserver
from tuneloop.train.sft import TrainResult

EXAMPLE = "support-triage"


def bundled_example_dir(name: str = EXAMPLE) -> Path:
    """The example shipped in the wheel (``tuneloop/bundled``) or, in a source checkout, ``examples/``."""
    installed = Path(__file__).parent / "bundled" / name
    if installed.is_dir():
        return installed
    checkout = Path(__file__).resolve().parents[2] / "examples" / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"bundled example {name!r} not found (looked in {installed} and {checkout})")


@dataclass(frozen=True)
class DemoResult:
    config: RunConfig
    train: TrainResult
    eval: EvalResult


def demo_config(output_dir: Path | None = None) -> RunConfig:
    config = load_config(bundled_example_dir() / "config.yaml")
    chosen = output_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    return config.model_copy(update={"output_dir": chosen})


def run_demo(
    output_dir: Path | None = None,
    observer: TrainObserver | None = None,
    progress: ProgressCallback | None = None,
) -> DemoResult:
    config = demo_config(output_dir)
    trained = train.run(config, observer=observer)
    evaluated = evaluate.run(config, progress=progress)
    return DemoResult(config, trained, evaluated)
