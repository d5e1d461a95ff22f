"""``kernels: compile`` with the real Inductor backend on the CPU (C++ kernels): a tiny model trains the same.

Integration tier: Inductor compiles C++ with the system compiler (tens of seconds). The unit tests prove the
wiring with ``aot_eager``; this proves the default backend really runs forward and backward.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.unit.test_fast_compile import batches, build, step
from tuneloop.train.fast import apply_fast_path

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="Inductor on CPU needs a C++ compiler"),
]


def test_inductor_compiled_layers_match_eager_on_cpu(tiny_config, tiny_model_dir, tiny_tokenizer):
    config = tiny_config(lora_dropout=0.0, kernels="compile", gradient_checkpointing=True)
    batch = batches(tiny_tokenizer, sizes=(4,))[0]
    want_loss, want_grads = step(build(tiny_model_dir, config), batch)
    model = build(tiny_model_dir, config)
    report = apply_fast_path(model, config, device=torch.device("cpu"), tokens_per_micro_batch=512)
    assert report.kernels == "compile", report.reasons
    loss, grads = step(model, batch)
    assert loss == pytest.approx(want_loss, rel=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-3, atol=1e-5)
