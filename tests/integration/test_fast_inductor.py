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
from tuneloop.train.fast.memory import decoder_layers

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


def _saved_bytes_and_step(model, batch, layer, backend):
    """Bytes one compiled decoder layer saves for its backward pass, and the training step's loss and gradients."""
    from tuneloop.train.fast.fused import fused_layers_for

    saved: list[int] = []
    recording = {"on": False}

    def pack(tensor):
        if recording["on"] and not isinstance(tensor, torch.nn.Parameter):
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    layer.register_forward_pre_hook(lambda *_: recording.update(on=True))
    layer.register_forward_hook(lambda *_: recording.update(on=False))
    layer.compile(backend=backend, dynamic=True)
    with fused_layers_for(model, "compile"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = step(model, batch)
    return sum(saved), result


def test_compiled_layers_recompute_elementwise_results_instead_of_saving_them(tiny_config, tiny_model_dir, tiny_tokenizer):
    """The default partitioner saves SwiGLU's product and the normed inputs (matmuls read them in the backward
    pass); the layers' backend recomputes them from what it saves anyway. Same loss and gradients."""
    from torch._dynamo import lookup_backend

    from tuneloop.train.fast.compile import CompileOptions, inductor_recomputing_elementwise

    assert CompileOptions(backend="inductor").compiler() is inductor_recomputing_elementwise
    config = tiny_config(lora_dropout=0.0)
    batch = batches(tiny_tokenizer, sizes=(4,))[0]
    runs = {}
    for name, backend in (("default", lookup_backend("inductor")), ("recompute", inductor_recomputing_elementwise)):
        torch._dynamo.reset()
        model = build(tiny_model_dir, config)
        runs[name] = _saved_bytes_and_step(model, batch, decoder_layers(model)[1], backend)
    (default, reference), (lean, result) = runs["default"], runs["recompute"]
    hidden, intermediate = model.config.hidden_size, model.config.intermediate_size
    tokens = batch["input_ids"].numel()
    # at least SwiGLU's product (fp32 here) and one normed input fewer
    assert default - lean >= tokens * (intermediate + hidden) * 4, (default, lean)
    assert result[0] == pytest.approx(reference[0], rel=1e-5)
    for name, grad in result[1].items():
        torch.testing.assert_close(grad, reference[1][name], rtol=1e-4, atol=1e-6)
