"""Early stopping on validation loss, as a pure function of the trainer state.

The counters live in :class:`~tuneloop.train.checkpoint.TrainerState`, not in an object of their own, so
they are checkpointed with everything else: a resumed run stops exactly where an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tuneloop.train.checkpoint import TrainerState


@dataclass(frozen=True)
class Verdict:
    state: TrainerState
    improved: bool
    stop: bool


def judge(state: TrainerState, val_loss: float | None, patience: int | None, min_delta: float) -> Verdict:
    """Record one validation: a new best resets the patience counter, anything else spends one unit of it.

    ``improved`` means better than the best by more than ``min_delta`` (the first validation always is).
    ``stop`` is only ever true with a ``patience`` set.
    """
    if val_loss is None:
        return Verdict(state, improved=False, stop=False)
    best = state.best_val_loss
    improved = best is None or val_loss < best - min_delta
    if improved:
        state = replace(state, best_val_loss=val_loss, best_step=state.step, evals_without_improvement=0)
    else:
        state = replace(state, evals_without_improvement=state.evals_without_improvement + 1)
    stop = patience is not None and state.evals_without_improvement >= patience
    return Verdict(state, improved=improved, stop=stop)
