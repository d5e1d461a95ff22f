"""Experiment tracking: TensorBoard by default when installed; Weights & Biases and MLflow when configured.

Every backend is an optional dependency imported only when used. The trackers listen to the same
observer calls as the CLI's progress bar, so the recipes know nothing about them; only the main process
tracks. A backend asked for explicitly but not installed is an error before training starts, not a
silently empty dashboard.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

from tuneloop.config import RunConfig
from tuneloop.train.observer import TrainObserver

INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class Backend(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, folder: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after its last checkpoint, so a resumed curve has no doubles
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, config: RunConfig, out: Path) -> None:
        import wandb

        self.run = wandb.init(
            project=config.tracking_project,
            name=out.name,
            dir=str(out),
            config=config.model_dump(mode="json"),
            resume="allow",
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, config: RunConfig, out: Path) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(config.tracking_project)
        self.run = mlflow.start_run(run_name=out.name)
        params = {k: str(v)[:250] for k, v in config.model_dump(mode="json").items()}
        mlflow.log_params(params)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def chosen_backends(config: RunConfig) -> tuple[str, ...]:
    """The backend names ``report_to`` resolves to on this machine."""
    if config.report_to == "none":
        return ()
    if config.report_to == "auto":
        return ("tensorboard",) if importlib.util.find_spec("tensorboard") is not None else ()
    missing = [name for name in config.report_to if importlib.util.find_spec(INSTALL[name]) is None]
    if missing:
        raise RuntimeError(
            f"report_to lists {', '.join(missing)}, not installed here: pip install {' '.join(INSTALL[m] for m in missing)}"
        )
    return tuple(config.report_to)


def open_backends(config: RunConfig, out: Path, purge_step: int | None = None) -> list[Backend]:
    backends: list[Backend] = []
    for name in chosen_backends(config):
        if name == "tensorboard":
            backends.append(_TensorBoard(out / "tensorboard", purge_step))
        elif name == "wandb":
            backends.append(_WandB(config, out))
        else:
            backends.append(_MLflow(config, out))
    return backends


class TrackingObserver:
    """Forwards every observer call to ``inner`` and numeric metrics to the tracking backends."""

    def __init__(self, inner: TrainObserver, backends: list[Backend]) -> None:
        self.inner = inner
        self.backends = backends

    def _log(self, step: int, metrics: dict[str, Any], prefix: str) -> None:
        numbers = {
            f"{prefix}/{k}": float(v)
            for k, v in metrics.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for backend in self.backends:
            backend.log(step, numbers)

    def on_fast_path(self, report: Any) -> None:
        """Forwarded to observers that listen for it (the hook is optional, see ``TrainObserver``)."""
        listener = getattr(self.inner, "on_fast_path", None)
        if listener is not None:
            listener(report)

    def on_train_start(self, total_steps: int, done_steps: int) -> None:
        self.inner.on_train_start(total_steps, done_steps)

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        self._log(step, metrics, "train")
        self.inner.on_step(step, metrics)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        self._log(int(metrics["step"]), metrics, "eval")
        self.inner.on_epoch_end(epoch, metrics)

    def on_train_end(self) -> None:
        self.close()
        self.inner.on_train_end()

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []
