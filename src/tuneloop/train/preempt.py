"""SIGTERM (preemption, ``kill``, a scheduler's time limit) asks for a checkpoint, not an abrupt death.

The handler only sets a flag; the loop checks it between optimizer steps, where the model, optimizer and
data position are consistent, writes a checkpoint there and raises :class:`Preempted`. The previous
handler is restored on the way out, so nothing outlives the run (no global state).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Preempted(RuntimeError):
    """Training stopped on SIGTERM after writing a checkpoint; ``--resume`` continues from it."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(
            f"stopped by SIGTERM after writing {checkpoint}; run the same command with --resume to continue"
        )
        self.checkpoint = checkpoint


class StopRequest:
    """A flag a signal handler sets and the training loop reads."""

    def __init__(self) -> None:
        self.requested = False


@contextmanager
def sigterm_requests_checkpoint() -> Iterator[StopRequest]:
    """Within the block, SIGTERM sets ``.requested`` instead of killing the process (main thread only)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: object) -> None:
        request.requested = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, previous)
