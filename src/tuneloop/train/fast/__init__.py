"""The fast path of tuneloop's own trainer (issue 7): packing, fused loss, compiled layers, memory planning.

Each module is imported where it is used (``from tuneloop.train.fast.packing import pack``); importing this
package has no side effects and pulls in no optional dependency.
"""

from typing import Any

__all__ = ["FastPathReport", "apply_fast_path"]


def __getattr__(name: str) -> Any:
    """``apply_fast_path`` / ``FastPathReport`` (``fast/apply.py``), imported on first use: ``train.loss``
    imports this package, and ``apply`` imports ``train.loss`` through the memory estimate."""
    if name in __all__:
        from tuneloop.train.fast import apply

        return getattr(apply, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
