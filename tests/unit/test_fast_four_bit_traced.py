"""The 4-bit LoRA linear as compiled QLoRA layers run it: the weight rebuilt by traced tensor ops, in both passes,
and never saved between them. No bitsandbytes needed: compiled, the linear uses no bitsandbytes op, so these run
everywhere (the tests against bitsandbytes itself are in test_fast_fused_4bit.py and tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from tuneloop.train.fast.four_bit import lora_4bit_linear, traced_dequantize_4bit

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("fresh_dynamo")]

BLOCK, NESTED_BLOCK = 64, 256


def test_nibbles_are_read_high_first_and_scaled_by_their_block():
    packed = torch.tensor([[0x1F], [0x80]], dtype=torch.uint8)  # weights 1, 15, 8, 0
    code = torch.arange(16, dtype=torch.float32) / 10
    layout = (2, "nf4", (2, 2), torch.float32, 0)  # blocks of two weights
    weight = traced_dequantize_4bit(packed, torch.tensor([2.0, 3.0]), None, None, None, code, layout)
    assert weight.flatten().tolist() == pytest.approx([0.2, 3.0, 2.4, 0.0])
    # double quantisation: each 8-bit block scale is nested_code[scale] * its nested block's absmax + offset
    nested = traced_dequantize_4bit(
        packed, torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([4.0]), torch.tensor([0.0, 0.25, 0.5]),
        torch.tensor(0.5), code, (2, "nf4", (2, 2), torch.float32, 256),
    )  # fmt: skip
    assert nested.flatten().tolist() == pytest.approx([0.15, 2.25, 2.0, 0.0])  # scales 1.5 and 2.5


def random_four_bit(shape: tuple[int, int]) -> tuple[tuple[torch.Tensor, ...], tuple]:
    """Random 4-bit bytes with double-quantised scales, laid out as bitsandbytes lays out an NF4 weight."""
    count = shape[0] * shape[1]
    blocks = -(-count // BLOCK)
    quantized = (
        torch.randint(0, 256, (count // 2, 1), dtype=torch.uint8),
        torch.randint(0, 256, (blocks,), dtype=torch.uint8),
        torch.rand(-(-blocks // NESTED_BLOCK)) + 0.5,
        torch.linspace(-1, 1, 256),
        torch.tensor(0.1),
        torch.linspace(-1, 1, 16),
    )
    return quantized, (BLOCK, "nf4", shape, torch.float32, NESTED_BLOCK)


def test_compiled_4bit_lora_linear_is_the_dense_computation_and_saves_no_dense_weight():
    torch.manual_seed(0)
    quantized, layout = random_four_bit((48, 64))
    weight = traced_dequantize_4bit(*quantized, layout)
    a = torch.randn(4, 64, requires_grad=True)
    b = torch.randn(48, 4, requires_grad=True)
    x = torch.randn(3, 5, 64, requires_grad=True)

    def dense(x, a, b):
        return x @ weight.t() + 2.0 * (x @ a.t()) @ b.t()

    def four_bit(x, a, b):
        return lora_4bit_linear(x, quantized, layout, None, a, b, 2.0)

    want = dense(x, a, b)
    want_grads = torch.autograd.grad(want.square().sum(), (x, a, b))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = torch.compile(four_bit, backend="aot_eager", fullgraph=True)(x, a, b)
    grads = torch.autograd.grad(got.square().sum(), (x, a, b))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for grad, want_grad in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-4)
    # the backward pass rebuilt the weight from the packed bytes: neither the weight nor its transpose was kept
    assert not [t for t in saved if t.shape in (weight.shape, weight.t().shape) and t.is_floating_point()]
    assert any(t.dtype == torch.uint8 for t in saved)
