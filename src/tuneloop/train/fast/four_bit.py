"""A LoRA linear over a bitsandbytes 4-bit base, forward and backward (QLoRA fast path).

The arithmetic is :mod:`tuneloop.train.fast.fused`'s (three matmuls forward, the adapter's product added in
cuBLAS's epilogue; the same backward), over a dense weight rebuilt from its 4-bit bytes through bitsandbytes'
own registered ops (which ``torch.compile`` traces through their fake kernels): in the forward pass, and again
in the backward pass. No dense weight outlives one matmul, which is what keeps QLoRA's memory at 4 bits a
weight (bitsandbytes' ``matmul_4bit`` does the same).

Why the backward pass is one registered operator (``torch.library.custom_op``): inside a compiled decoder
layer AOTAutograd traces an ``autograd.Function``'s forward and backward into one graph, where two identical
rebuilds of the weight are merged and the dense weight is then *saved* between the passes: every compiled
QLoRA layer kept its weights in bf16 (CPU test with ``aot_eager`` and Inductor). Inside the operator the
second rebuild is out of the graph's sight, so the backward references only the packed bytes.

Why the forward pass is not an operator too (it was, first): an operator call costs Python on every call
(its wrapper, then our code issuing a dozen torch calls), and at 224 linears of an 8B model, three passes a
step, the host became the limit (bench/README.md, QLoRA). Traced ops run from Inductor's generated code.
"""

from typing import Any

import torch

from tuneloop.train.fast.linear_ce import linear_dtype
from tuneloop.train.fast.lora_matmuls import lora_forward, lora_grads

# blocksize, quant type, shape, dtype, nested blocksize
Layout = tuple[int, str, tuple[int, ...], torch.dtype, int]


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    layout: Layout,
) -> torch.Tensor:
    """A bitsandbytes 4-bit weight as a dense tensor: ``bitsandbytes.functional.dequantize_4bit``'s arithmetic
    on the tensors :func:`four_bit_parts` takes out of the layer (double quantisation: the 8-bit absmax scales
    are dequantized first)."""
    blocksize, quant_type, shape, dtype, nested_blocksize = layout
    ops = torch.ops.bitsandbytes
    if nested_absmax is not None:
        absmax = (
            ops.dequantize_blockwise(absmax, nested_absmax, nested_code, nested_blocksize, torch.float32)
            + offset
        )
    return ops.dequantize_4bit(packed, absmax, blocksize, quant_type, list(shape), dtype)


def four_bit_parts(base: torch.nn.Module) -> tuple[tuple[torch.Tensor | None, ...], Layout]:
    """The tensors and constants :func:`dequantize_4bit` rebuilds a bitsandbytes ``Linear4bit``'s weight from."""
    state = base.weight.quant_state
    nested = state.state2 if state.nested else None
    tensors = (
        base.weight.data,  # the packed bytes as a plain tensor (the parameter itself is bitsandbytes' subclass)
        state.absmax,
        nested.absmax if nested is not None else None,
        nested.code if nested is not None else None,
        state.offset if nested is not None else None,
    )
    layout = (
        state.blocksize,
        state.quant_type,
        tuple(state.shape),
        state.dtype,
        nested.blocksize if nested else 0,
    )
    return tensors, layout


@torch.library.custom_op("tuneloop::lora_4bit_linear_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    quant_type: str,
    shape: list[int],
    weight_dtype: torch.dtype,
    nested_blocksize: int,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
    needs_input_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for ``x`` (empty unless ``needs_input_grad``), ``A`` and ``B``; the weight rebuilt again."""
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    weight = None
    if needs_input_grad:
        layout = (blocksize, quant_type, tuple(shape), weight_dtype, nested_blocksize)
        weight = dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, layout).to(dtype)
    grad_x, grad_a, grad_b = lora_grads(
        grad_out, rows, weight, lora_a.to(dtype), lora_b.to(dtype), u, scaling,
        (x.dtype, lora_a.dtype, lora_b.dtype), (needs_input_grad, True, True),
    )  # fmt: skip
    return grad_x if grad_x is not None else x.new_empty(0), grad_a, grad_b


@_backward_op.register_fake
def _(grad_out, x, u, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
      weight_dtype, nested_blocksize, lora_a, lora_b, scaling, dtype, needs_input_grad):  # fmt: skip
    grad_x = torch.empty_like(x) if needs_input_grad else x.new_empty(0)
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b)


class _Lora4bitLinear(torch.autograd.Function):
    """Forward: the weight rebuilt, then the fused LoRA matmuls, traced into a compiled layer's graph like any ops
    (Inductor calls them from its generated code: no per-call Python). Backward: one opaque operator, which
    rebuilds the weight again out of the graph's sight; the forward's weight is not referenced by the backward,
    so it is never saved."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        quantized: tuple[torch.Tensor | None, ...],
        layout: Layout,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        weight = dequantize_4bit(*quantized, layout)
        dtype = linear_dtype(x, weight)
        out, _, _, _, _, u = lora_forward(x, weight, bias, lora_a, lora_b, scaling, dtype)
        ctx.save_for_backward(x, u, *quantized, lora_a, lora_b)
        ctx.layout, ctx.scaling, ctx.dtype = layout, scaling, dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        x, u, *quantized, lora_a, lora_b = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[0]
        blocksize, quant_type, shape, weight_dtype, nested_blocksize = ctx.layout
        grad_x, grad_a, grad_b = _backward_op(
            grad_out, x, u, *quantized, blocksize, quant_type, list(shape), weight_dtype, nested_blocksize,
            lora_a, lora_b, ctx.scaling, ctx.dtype, needs_x,
        )  # fmt: skip
        return grad_x if needs_x else None, None, None, None, grad_a, grad_b, None


def lora_4bit_linear(
    x: torch.Tensor,
    quantized: tuple[torch.Tensor | None, ...],
    layout: Layout,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``x @ W.T (+ bias) + scaling * (x @ A.T) @ B.T`` for a 4-bit ``W`` (:func:`four_bit_parts`), in the
    autocast dtype when autocast is on (as ``F.linear`` would run), else in the input and weight's common dtype."""
    return _Lora4bitLinear.apply(x, quantized, layout, bias, lora_a, lora_b, float(scaling))
