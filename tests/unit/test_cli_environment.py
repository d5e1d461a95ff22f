"""The CUDA allocator default the CLI sets before torch loads (``tuneloop.cli.environment``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tuneloop.cli.environment import ALLOCATOR_VARIABLES, EXPANDABLE_SEGMENTS, default_cuda_allocator

pytestmark = pytest.mark.unit

PROBE = f"""import json, os
from tuneloop.cli.environment import default_cuda_allocator
name = default_cuda_allocator(os.environ)
print(json.dumps({{"set": name, "env": {{k: os.environ.get(k) for k in {ALLOCATOR_VARIABLES!r}}}}}))
"""


def probe(**extra: str) -> dict:
    """A fresh interpreter (torch not yet imported there), with the allocator variables as given."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARIABLES} | extra
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform == "win32", reason="expandable segments are not supported on Windows")
def test_a_fresh_process_gets_expandable_segments_under_the_variable_its_torch_reads():
    result = probe()
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    expected = "PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 10) else "PYTORCH_CUDA_ALLOC_CONF"
    assert result["set"] == expected
    assert result["env"][expected] == EXPANDABLE_SEGMENTS


@pytest.mark.parametrize("name", ALLOCATOR_VARIABLES)
def test_the_users_own_allocator_setting_is_left_alone(name):
    result = probe(**{name: "max_split_size_mb:64"})
    assert result["set"] is None
    assert result["env"][name] == "max_split_size_mb:64"
    assert [v for v in result["env"].values() if v is not None] == ["max_split_size_mb:64"]


def test_once_torch_is_imported_nothing_is_set():
    """torch has parsed the variable by then: setting it would only mislead whoever reads the environment."""
    assert "torch" in sys.modules
    environ: dict[str, str] = {}
    assert default_cuda_allocator(environ) is None and environ == {}
