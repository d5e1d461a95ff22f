"""A LoRA linear over a bitsandbytes 4-bit base, forward and backward (QLoRA fast path).

The arithmetic is :mod:`tuneloop.train.fast.fused`'s (three matmuls forward, the adapter's product added in
cuBLAS's epilogue; the same backward), over a dense weight rebuilt from its 4-bit bytes in the forward pass and
again in the backward pass. No dense weight outlives one matmul, which is what keeps QLoRA's memory at 4 bits a
weight (bitsandbytes' ``matmul_4bit`` does the same).

How the weight is rebuilt depends on who runs the code:

* **eagerly**, through bitsandbytes' own registered ops (one CUDA kernel each);
* **inside a compiled layer**, as plain tensor ops (:func:`traced_dequantize_4bit`: a 16-entry table lookup
  per nibble times its block's scale), which Inductor fuses into one kernel launched from its generated code.
  bitsandbytes' ops would be opaque calls, each running Python at every call (its op wrapper, then a ctypes
  launch), two per weight, three passes a step: at the 224 linears of an 8B model the host became the limit
  (bench/README.md, QLoRA).

Plain ops also let the backward pass be traced rather than hidden in an operator of its own. The partitioner
then sees two rebuilds of the same weight, one per pass, and must not join them: AOTAutograd's
common-subexpression elimination would merge identical ones, and the partitioner keeps (does not recompute) a
merged result the backward pass materializes anyway, i.e. it would save every dense weight between the passes.
So the backward pass spells its rebuild differently (``again=True``: the nibbles by floor division and
remainder, not shift and mask; the same values), and each pass rebuilds its own weight from the packed bytes.
The unit tests check what autograd saves, eagerly and compiled.
"""

import math
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
    code: torch.Tensor,
    layout: Layout,
    *,
    again: bool = False,
) -> torch.Tensor:
    """A bitsandbytes 4-bit weight as a dense tensor: ``bitsandbytes.functional.dequantize_4bit``'s arithmetic
    on the tensors :func:`four_bit_parts` takes out of the layer (double quantisation: the 8-bit absmax scales
    are dequantized first). Through bitsandbytes' kernels when run eagerly, through
    :func:`traced_dequantize_4bit` when being compiled (see the module docstring)."""
    if torch.compiler.is_compiling():
        return traced_dequantize_4bit(
            packed, absmax, nested_absmax, nested_code, offset, code, layout, again=again
        )
    blocksize, quant_type, shape, dtype, nested_blocksize = layout
    ops = torch.ops.bitsandbytes
    if nested_absmax is not None:
        absmax = (
            ops.dequantize_blockwise(absmax, nested_absmax, nested_code, nested_blocksize, torch.float32)
            + offset
        )
    return ops.dequantize_4bit(packed, absmax, blocksize, quant_type, list(shape), dtype)


def traced_dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    code: torch.Tensor,
    layout: Layout,
    *,
    again: bool = False,
) -> torch.Tensor:
    """bitsandbytes' 4-bit dequantization as tensor ops (the same values: its layout, its tables, fp32 products
    rounded once to the weight's dtype). Each byte holds two weights, the first in its high nibble; weight ``i``
    is ``code[nibble] * absmax[i // blocksize]``; with double quantisation, absmax scale ``j`` is itself
    ``nested_code[absmax[j]] * nested_absmax[j // nested_blocksize] + offset``. Views, lookups and pointwise
    ops only, so Inductor makes one kernel of it. ``again``: the backward pass's spelling (module docstring)."""
    blocksize, _, shape, dtype, nested_blocksize = layout
    count = math.prod(shape)
    if nested_absmax is not None:
        scales = _repeat_each(nested_absmax, nested_blocksize, absmax.numel())
        absmax = nested_code[absmax.long()] * scales + offset
    flat = packed.reshape(-1)
    halves = (flat // 16, flat % 16) if again else (flat >> 4, flat & 15)
    nibbles = torch.stack(halves, dim=-1).reshape(-1)[:count]
    values = code[nibbles.long()] * _repeat_each(absmax, blocksize, count)
    return values.to(dtype).reshape(shape)


def _repeat_each(scales: torch.Tensor, times: int, count: int) -> torch.Tensor:
    """Each scale repeated ``times`` (a block's worth), cut to ``count``: a broadcast view, no copy in a graph."""
    return scales[:, None].expand(-1, times).reshape(-1)[:count]


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
        state.code,  # the 16 values a nibble stands for (NF4 or FP4)
    )
    layout = (
        state.blocksize,
        state.quant_type,
        tuple(state.shape),
        state.dtype,
        nested.blocksize if nested else 0,
    )
    return tensors, layout


class _Lora4bitLinear(torch.autograd.Function):
    """Forward: the weight rebuilt, then the fused LoRA matmuls. Backward: the weight rebuilt again from the
    saved 4-bit bytes (never saved itself), then the fused LoRA gradients. Both traceable into a compiled layer."""

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
        out, rows, _, a, b, u = lora_forward(
            x, weight, bias, lora_a, lora_b, scaling, linear_dtype(x, weight)
        )
        ctx.save_for_backward(rows, a, b, u, *quantized)
        ctx.layout, ctx.scaling = layout, scaling
        ctx.dtypes = (x.dtype, lora_a.dtype, lora_b.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        rows, a, b, u, *quantized = ctx.saved_tensors
        needs = ctx.needs_input_grad
        weight = dequantize_4bit(*quantized, ctx.layout, again=True).to(rows.dtype) if needs[0] else None
        grad_x, grad_a, grad_b = lora_grads(
            grad_out, rows, weight, a, b, u, ctx.scaling, ctx.dtypes, (needs[0], needs[4], needs[5])
        )
        return grad_x, None, None, None, grad_a, grad_b, None


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
