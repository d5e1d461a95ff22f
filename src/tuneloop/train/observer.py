"""How a training run reports progress without knowing who listens (the CLI draws a rich progress bar)."""

from __future__ import annotations

from typing import Any, Protocol


class TrainObserver(Protocol):
    """What a listener implements. It may also define ``on_fast_path(report)`` to hear, before the first step,
    which kernels run the decoder layers and which layers are checkpointed (a
    :class:`tuneloop.train.fast.FastPathReport`); observers without it are not asked."""

    def on_train_start(self, total_steps: int, done_steps: int) -> None: ...

    def on_step(self, step: int, metrics: dict[str, Any]) -> None: ...

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self) -> None: ...


class SilentObserver:
    """The default: training reports only through ``metrics.jsonl``."""

    def on_train_start(self, total_steps: int, done_steps: int) -> None:
        pass

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        pass

    def on_train_end(self) -> None:
        pass
