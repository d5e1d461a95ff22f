"""Process settings the CLI makes before anything imports torch."""

from __future__ import annotations

import platform
import sys
from collections.abc import MutableMapping
from importlib import metadata

ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def default_cuda_allocator(environ: MutableMapping[str, str]) -> str | None:
    """Let the CUDA caching allocator grow its segments in place (``expandable_segments``) unless the user has
    configured the allocator; returns the variable set, or ``None``.

    Why: a training step allocates and frees blocks of many sizes (layer inputs parked and fetched back, the
    head's logits chunks, recomputed activations); with fixed segments the cache keeps blocks it cannot reuse,
    and the memory reserved from the GPU grows past what is allocated (8B LoRA step on the H200: 17.4 GiB
    reserved for a 16.4 GiB peak), which is how a run that fits on paper runs out of memory. Unsloth sets the
    same default when it is imported.

    torch reads the variable when it loads, so this only works before ``import torch``; after it, and where
    expandable segments are unsupported (Windows, WSL), it does nothing. torch 2.10 and later read
    ``PYTORCH_ALLOC_CONF``; earlier ones ``PYTORCH_CUDA_ALLOC_CONF``.
    """
    if any(name in environ for name in ALLOCATOR_VARIABLES) or "torch" in sys.modules:
        return None
    if sys.platform == "win32" or "microsoft" in platform.release().lower():
        return None
    try:
        major, minor = (int(part) for part in metadata.version("torch").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return None
    name = "PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 10) else "PYTORCH_CUDA_ALLOC_CONF"
    environ[name] = EXPANDABLE_SEGMENTS
    return name
