"""Fused linear cross-entropy: the same loss and gradients as full logits + ``F.cross_entropy``, in chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuneloop.train.fast.linear_ce import fused_linear_cross_entropy, loss_and_logit_grad
from tuneloop.train.loss import chunked_head_loss, head_loss

pytestmark = pytest.mark.unit


def reference(hidden, weight, targets, bias=None):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum", ignore_index=-100)


def inputs(rows=37, width=24, vocab=101, dtype=torch.float32, seed=0, ignored=()):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=generator).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, width, generator=generator) * 0.3).to(dtype).requires_grad_(True)
    bias = (torch.randn(vocab, generator=generator) * 0.1).to(dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    for row in ignored:
        targets[row] = -100
    return hidden, weight, bias, targets


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 37, 64])
def test_loss_and_gradients_equal_the_unfused_reference_at_any_chunk_size(chunk_rows):
    """37 rows: chunks of 5 and 16 leave a short last chunk; 37 and 64 are one chunk; 1 is one row per chunk."""
    hidden, weight, bias, targets = inputs(ignored=(3, 36))
    fused = fused_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=chunk_rows)
    expected = reference(hidden, weight, targets, bias)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_of(fused, hidden, weight, bias), grads_of(expected, hidden, weight, bias)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ignored_rows_add_no_loss_and_get_zero_gradient():
    hidden, weight, _, targets = inputs(ignored=(0, 7, 8))
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=4)
    (grad_hidden,) = grads_of(loss, hidden)
    assert torch.all(grad_hidden[[0, 7, 8]] == 0)
    assert grad_hidden[1].abs().sum() > 0
    kept = targets != -100
    torch.testing.assert_close(loss, reference(hidden[kept], weight, targets[kept]), rtol=1e-5, atol=1e-5)


def test_backward_scales_the_stored_gradients_by_the_incoming_gradient():
    """The loop divides the summed loss by the window's token count; gradients must follow the scale."""
    hidden, weight, _, targets = inputs()
    scaled = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=8) / 13.0
    expected = reference(hidden, weight, targets) / 13.0
    for got, want in zip(grads_of(scaled, hidden, weight), grads_of(expected, hidden, weight)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_frozen_head_computes_only_the_hidden_gradient():
    hidden, weight, _, targets = inputs()
    frozen = weight.detach()
    loss = fused_linear_cross_entropy(hidden, frozen, targets, chunk_rows=8)
    loss.backward()
    assert frozen.grad is None
    torch.testing.assert_close(hidden.grad, grads_of(reference(hidden, frozen, targets), hidden)[0], rtol=1e-5, atol=1e-6)


def test_bf16_within_bf16_tolerance_of_the_fp32_reference():
    hidden, weight, bias, targets = inputs(rows=64, width=64, vocab=257, dtype=torch.bfloat16, ignored=(5,))
    fused = fused_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=24)
    assert fused.dtype == torch.float32
    exact = [t.detach().float().requires_grad_(True) for t in (hidden, weight, bias)]
    expected = reference(exact[0], exact[1], targets, exact[2])
    torch.testing.assert_close(fused, expected, rtol=2e-2, atol=0.5)
    for got, want in zip(grads_of(fused, hidden, weight, bias), grads_of(expected, *exact)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=2e-2)


def test_under_autocast_the_matmul_runs_in_the_autocast_dtype_like_the_head():
    hidden, weight, _, targets = inputs(rows=32, width=32, vocab=97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
        expected = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    torch.testing.assert_close(fused, expected, rtol=1e-3, atol=1e-2)
    for got, want in zip(grads_of(fused, hidden, weight), grads_of(expected, hidden, weight)):
        assert got.dtype == torch.float32  # gradients come back in the parameters' own dtype
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-3)


def test_no_grad_path_returns_the_loss_without_a_graph():
    hidden, weight, _, targets = inputs()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(hidden, weight, targets).detach(), rtol=1e-5, atol=1e-5)


def test_empty_input_gives_zero_loss_that_still_backpropagates():
    hidden, weight, _, targets = inputs(rows=0)
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    loss.backward()
    assert float(loss.detach()) == 0.0 and hidden.grad.shape == (0, 24)


def test_head_loss_uses_the_fused_path_for_a_linear_head_and_matches_the_checkpointed_one():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    fused = head_loss(head, hidden, targets, chunk=7)
    fused_grads = torch.autograd.grad(fused, (hidden, head.weight))
    checkpointed = chunked_head_loss(head, hidden, targets, chunk=7)
    checkpointed_grads = torch.autograd.grad(checkpointed, (hidden, head.weight))
    torch.testing.assert_close(fused, checkpointed, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_grads, checkpointed_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_rejects_misshapen_inputs():
    hidden, weight, _, targets = inputs()
    with pytest.raises(ValueError, match="rows"):
        fused_linear_cross_entropy(hidden[None], weight, targets)
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_traced_logit_grad_step_gives_the_eager_loss_and_gradients(dtype):
    """What ``compiled_logit_grad`` compiles, traced by dynamo and AOTAutograd (``aot_eager``: no kernels built
    here; Inductor's own run is an integration test): 5 full chunks and a short one, ignored rows among them."""
    hidden, weight, bias, targets = inputs(rows=37, width=32, vocab=101, dtype=dtype, ignored=(3, 36))
    traced = torch.compile(loss_and_logit_grad, backend="aot_eager", fullgraph=True)
    eager = fused_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=7)
    compiled = fused_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=7, logit_grad=traced)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads_of(compiled, hidden, weight, bias), grads_of(eager, hidden, weight, bias)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
