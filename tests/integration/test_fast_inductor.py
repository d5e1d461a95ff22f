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


def test_inductor_compiled_logit_grad_matches_eager_on_cpu():
    """The head's elementwise step as ``TrainedTokenLoss(compiled=True)`` runs it, with Inductor's kernels:
    bf16 logits of 4 full chunks and a short one, ignored rows among them."""
    from tests.unit.test_fast_linear_ce import grads_of, inputs
    from tuneloop.train.fast.linear_ce import compiled_logit_grad, fused_linear_cross_entropy

    hidden, weight, bias, targets = inputs(rows=45, width=64, vocab=1000, dtype=torch.bfloat16, ignored=(2, 44))
    eager = fused_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=10)
    compiled = fused_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=10, logit_grad=compiled_logit_grad())
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads_of(compiled, hidden, weight, bias), grads_of(eager, hidden, weight, bias)):
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-4)
