"""GPU tests: skipped cleanly, at collection, on machines without CUDA (CI); marked ``gpu``."""

from __future__ import annotations

import importlib.util

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "tests/gpu" not in str(item.fspath):
            continue
        item.add_marker(pytest.mark.gpu)
        if not torch.cuda.is_available():
            item.add_marker(no_cuda)


needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (pip install 'tuneloop[gpu]')"
)
