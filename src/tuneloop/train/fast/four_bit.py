"""A LoRA linear over a bitsandbytes 4-bit base as one opaque operator, forward and backward (QLoRA fast path).

The arithmetic is :mod:`tuneloop.train.fast.fused`'s (three matmuls forward, the adapter's product added in
cuBLAS's epilogue; the same backward), over a dense weight rebuilt from its 4-bit bytes through bitsandbytes'
own registered ops: in the forward pass, and again in the backward pass. No dense weight outlives one matmul,
which is what keeps QLoRA's memory at 4 bits a weight (bitsandbytes' ``matmul_4bit`` does the same).

Why a registered operator (``torch.library.custom_op``) and not an ``autograd.Function``: inside a compiled
decoder layer AOTAutograd traces a Function's forward and backward into one graph, where the two identical
dequantize calls are merged and the dense weight is then *saved* between the passes: every compiled QLoRA
layer kept its weights in bf16 (CPU test with ``aot_eager`` and Inductor). An operator is opaque to that
graph: what it saves is what :func:`_save` says, the packed bytes.

Shapes, dtypes and the layout travel as operator arguments; the ``fake`` functions give ``torch.compile``
the output shapes without running anything.
"""

import math
from typing import Any

import torch
import torch.nn.functional as F

Layout = tuple[
    int, str, tuple[int, ...], torch.dtype, int
]  # blocksize, quant type, shape, dtype, nested blocksize


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


@torch.library.custom_op("tuneloop::lora_4bit_linear", mutates_args=())
def _forward(
    x: torch.Tensor,
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
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x @ W.T + bias + scaling * u @ B.T, u)`` with ``u = x @ A.T``, in ``dtype``."""
    layout = (blocksize, quant_type, tuple(shape), weight_dtype, nested_blocksize)
    weight = dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, layout)
    with torch.autocast(x.device.type, enabled=False):
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        out = F.linear(rows, weight.to(dtype), bias.to(dtype) if bias is not None else None)
        u = rows @ lora_a.to(dtype).t()
        out.addmm_(u, lora_b.to(dtype).t(), alpha=scaling)
    return (
        out,
        u,
    )  # [rows, out_features]: the caller gives it x's leading shape (an operator returns no views)


@_forward.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, weight_dtype,
      nested_blocksize, bias, lora_a, lora_b, scaling, dtype):  # fmt: skip
    rows = math.prod(x.shape[:-1])
    return x.new_empty((rows, shape[0]), dtype=dtype), x.new_empty((rows, lora_a.shape[0]), dtype=dtype)


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
    with torch.autocast(x.device.type, enabled=False):
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        gu = g @ b  # [rows, r]: the gradient reaching the adapter's inner product, before scaling
        grad_x = x.new_empty(0)
        if needs_input_grad:
            layout = (blocksize, quant_type, tuple(shape), weight_dtype, nested_blocksize)
            weight = dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, layout).to(dtype)
            grad_x = (g @ weight).addmm_(gu, a, alpha=scaling).view(x.shape).to(x.dtype)
        # beta=0: the first argument only gives the shape; cuBLAS neither reads it nor propagates NaNs from it
        grad_a = torch.addmm(a, gu.t(), rows, beta=0, alpha=scaling).to(lora_a.dtype)
        grad_b = torch.addmm(b, g.t(), u, beta=0, alpha=scaling).to(lora_b.dtype)
    return grad_x, grad_a, grad_b


@_backward_op.register_fake
def _(grad_out, x, u, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
      weight_dtype, nested_blocksize, lora_a, lora_b, scaling, dtype, needs_input_grad):  # fmt: skip
    grad_x = torch.empty_like(x) if needs_input_grad else x.new_empty(0)
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b)


_QUANTIZED = slice(1, 6)  # packed, absmax, nested absmax, nested code, offset
_LAYOUT = slice(6, 11)


def _save(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    """What the backward pass keeps: the input, ``u``, the packed weight and the adapter; never a dense weight."""
    x, lora_a, lora_b = inputs[0], inputs[12], inputs[13]
    ctx.save_for_backward(x, output[1], *inputs[_QUANTIZED], lora_a, lora_b)
    ctx.layout = inputs[_LAYOUT]
    ctx.scaling, ctx.dtype = inputs[14], inputs[15]


def _backward(ctx: Any, grad_out: torch.Tensor, grad_u: torch.Tensor | None) -> tuple[Any, ...]:
    x, u, *quantized, lora_a, lora_b = ctx.saved_tensors
    needs_x = ctx.needs_input_grad[0]
    grad_x, grad_a, grad_b = _backward_op(
        grad_out, x, u, *quantized, *ctx.layout, lora_a, lora_b, ctx.scaling, ctx.dtype, needs_x
    )
    return (grad_x if needs_x else None, *(None,) * 11, grad_a, grad_b, None, None)


_forward.register_autograd(_backward, setup_context=_save)


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
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(x.dtype, layout[3])
    blocksize, quant_type, shape, weight_dtype, nested_blocksize = layout
    out, _ = _forward(
        x, *quantized, blocksize, quant_type, list(shape), weight_dtype, nested_blocksize, bias, lora_a, lora_b,
        float(scaling), dtype,
    )  # fmt: skip
    return out.view(*x.shape[:-1], out.shape[-1])
