"""The arithmetic of a LoRA linear over a frozen base, shared by the fused layers over dense weights
(:mod:`tuneloop.train.fast.fused`) and over bitsandbytes 4-bit weights (:mod:`tuneloop.train.fast.four_bit`).

Forward ``x @ W.T (+ bias) + s * (x @ A.T) @ B.T`` as three matmuls, the adapter's product added in the second
matmul's cuBLAS epilogue (``addmm_`` with ``alpha=s``); backward five matmuls, the input gradient's adapter
term added the same way. No full-size elementwise pass either way. What the backward pass needs (the input
rows, the weight, the adapter weights, ``u = x @ A.T``) each caller saves or rebuilds as suits its weight.

Inside a compiled layer the in-place ``addmm_`` is an operator of ours (:func:`add_product_`) rather than
``Tensor.addmm_``: AOTAutograd makes every in-place op functional, and a functional ``addmm`` writes a new
tensor, so cuBLAS first copied the whole output into it (``Memcpy DtoD``: 680 copies and 15 ms of a 425 ms
QLoRA step of an 8B model on the H200). Inductor puts a mutating operator back in place when nothing else
reads its input, which is the case here. The operator runs one line of Python per call, so eager code (where
``addmm_`` is in place anyway) calls ``addmm_`` directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Defined with a schema and one kernel for every backend rather than with ``torch.library.custom_op``, whose
# Python dispatch layers cost 17 us a call against 3 us here (CPU). A compiled 8B forward pass calls it 224 times;
# profiled on the H200 it took 15 ms of the host's 76 ms for a pass the GPU ran in 90 ms (the host must stay
# ahead of the GPU, or the GPU waits). No autograd formula: it runs only where autograd does not record (inside
# the fused linears' own forward and backward).
torch.library.define(
    "tuneloop::add_product_", "(Tensor(a!) out, Tensor left, Tensor right, float alpha) -> ()"
)


@torch.library.impl("tuneloop::add_product_", "CompositeExplicitAutograd")
def _add_product_kernel(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float) -> None:
    out.addmm_(left, right, alpha=alpha)


@torch.library.register_fake("tuneloop::add_product_")
def _(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float) -> None:
    return None


def add_product_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float) -> torch.Tensor:
    """``out += alpha * left @ right`` in place (cuBLAS's epilogue), compiled or not; returns ``out``."""
    if torch.compiler.is_compiling():
        torch.ops.tuneloop.add_product_(out, left, right, alpha)
        return out
    return out.addmm_(left, right, alpha=alpha)


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output (``x``'s leading shape) and, in ``dtype``, the input rows, ``W``, ``A``, ``B`` and ``u``."""
    with torch.autocast(x.device.type, enabled=False):
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        out = F.linear(rows, w, bias.to(dtype) if bias is not None else None)
        u = rows @ a.t()
        add_product_(out, u, b.t(), scaling)
    return out.view(*x.shape[:-1], out.shape[-1]), rows, w, a, b, u


def lora_grads(
    grad_out: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    u: torch.Tensor,
    scaling: float,
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the input, ``A`` and ``B`` (those ``needs`` asks for; ``weight`` only for the input's), in
    ``dtypes`` (the input's, ``A``'s and ``B``'s); ``rows``, ``weight``, ``a``, ``b``, ``u`` as
    :func:`lora_forward` returned them."""
    x_dtype, a_dtype, b_dtype = dtypes
    with torch.autocast(grad_out.device.type, enabled=False):
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(rows.dtype)
        gu = g @ b  # [rows, r]: the gradient reaching the adapter's inner product, before scaling
        grad_x = None
        if needs[0]:
            assert weight is not None, "the input's gradient needs the weight"
            grad_x = (
                add_product_(g @ weight, gu, a, scaling)
                .view(*grad_out.shape[:-1], weight.shape[1])
                .to(x_dtype)
            )
        # beta=0: the first argument only gives the shape; cuBLAS neither reads it nor propagates NaNs from it
        grad_a = torch.addmm(a, gu.t(), rows, beta=0, alpha=scaling).to(a_dtype) if needs[1] else None
        grad_b = torch.addmm(b, g.t(), u, beta=0, alpha=scaling).to(b_dtype) if needs[2] else None
    return grad_x, grad_a, grad_b
