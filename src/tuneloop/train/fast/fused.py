"""Fewer, larger kernels for eager layers: LoRA linears as three matmuls, RMSNorm as torch's own fused op.

Why: under CUDA graphs the embedded 135M model no longer waits for the host, and what is left of a step is
the GPU running ~7,000 kernels, most of them elementwise passes over a ``[tokens, width]`` tensor (issue 7,
workload c, H200 profile). PEFT's LoRA linear computes ``base(x) + lora_B(lora_A(x)) * scaling``: two casts of
the adapter weights, three matmuls, then a multiply and an add over the whole output, forward; backward the
multiply, the add of the two input gradients and the casts come back. Here the adapter's product is added
inside the second matmul (``out.addmm_(u, B.T, alpha=scaling)``, the add and the scaling in cuBLAS's
epilogue) and the backward pass does the same for the input gradient, so an adapted linear is three matmuls
forward and five backward, with no full-size elementwise pass. A HF RMSNorm is eight elementwise ops
(upcast, square, mean, add, rsqrt, multiply, downcast, weight) and twelve more backward; ``F.rms_norm`` is one
fused op each way on CUDA.

How, without patching PEFT or transformers: for the training loop only, :func:`fused_layers` puts an
equivalent module in the place of each eligible layer, holding the *same* parameter objects under the *same*
names (``base_layer``, ``lora_A``, ``lora_B``; ``weight``), so the optimizer, gradient clipping and
checkpoints see nothing change; the original modules are put back when the loop ends, before the adapter is
saved. A layer that is not plain LoRA (DoRA, dropout, a LoRA bias, a quantized or trained base, several
adapters) keeps PEFT's forward; a norm is replaced only if the fused op reproduces it on a probe input (a
Gemma-style ``1 + weight`` norm does not, and stays).

Numerics: the same bf16 operands and fp32 accumulation as PEFT's path, with one rounding fewer (the adapter
term is added before the output is rounded, not after); fp32 runs match PEFT to float rounding (unit test).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneloop.train.fast.linear_ce import linear_dtype

PROBE_TOLERANCE = 1e-5  # fp32 relative error a replacement norm may show on the probe input


class _LoraLinear(torch.autograd.Function):
    """``x @ W.T (+ bias) + scaling * (x @ A.T) @ B.T`` with a frozen ``W``; gradients for ``x``, ``A``, ``B``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        dtype = linear_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            out = F.linear(rows, w, bias.to(dtype) if bias is not None else None)
            u = rows @ a.t()
            out.addmm_(u, b.t(), alpha=scaling)
        ctx.save_for_backward(rows, w, a, b, u)
        ctx.scaling = scaling
        ctx.dtypes = (x.dtype, lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        rows, w, a, b, u = ctx.saved_tensors
        s = ctx.scaling
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(rows.dtype)
            gu = g @ b  # [rows, r]: the gradient reaching the adapter's inner product, before scaling
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ w).addmm_(gu, a, alpha=s).view(*grad_out.shape[:-1], w.shape[1]).to(x_dtype)
            # beta=0: the first argument only gives the shape; cuBLAS neither reads it nor propagates NaNs from it
            grad_a = (
                torch.addmm(a, gu.t(), rows, beta=0, alpha=s).to(a_dtype) if ctx.needs_input_grad[3] else None
            )
            grad_b = (
                torch.addmm(b, g.t(), u, beta=0, alpha=s).to(b_dtype) if ctx.needs_input_grad[4] else None
            )
        return grad_x, None, None, grad_a, grad_b, None


class FusedLoraLinear(nn.Module):
    """A PEFT LoRA ``Linear``'s forward as :class:`_LoraLinear`, over the layer's own modules and names."""

    def __init__(self, layer: nn.Module, adapter: str) -> None:
        super().__init__()
        self.base_layer = layer.base_layer
        self.lora_A = layer.lora_A
        self.lora_B = layer.lora_B
        self.adapter = adapter
        self.scaling = float(layer.scaling[adapter])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return _LoraLinear.apply(
            x,
            base.weight,
            base.bias,
            self.lora_A[self.adapter].weight,
            self.lora_B[self.adapter].weight,
            self.scaling,
        )


class FusedRMSNorm(nn.Module):
    """``F.rms_norm`` over a norm's own ``weight``, in the input's dtype (as HF's RMSNorm returns it)."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # autocast would run the norm in fp32 and upcast x
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


def plain_lora_adapter(module: nn.Module) -> str | None:
    """The adapter name if ``module`` is a PEFT LoRA ``Linear`` that :class:`FusedLoraLinear` computes exactly."""
    from peft.tuners.lora.layer import Linear

    if type(module) is not Linear or module.merged or module.disable_adapters or module.fan_in_fan_out:
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1 or active != list(module.active_adapters):
        return None
    name = active[0]
    base = module.base_layer
    plain = (
        name not in module.lora_variant  # DoRA and other variants have their own arithmetic
        and isinstance(module.lora_dropout[name], nn.Identity)
        and module.lora_B[name].bias is None
        and type(base) is nn.Linear
        and not base.weight.requires_grad
    )
    return name if plain else None


def _norm_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, float | int) else None


def rms_norm_replacement(module: nn.Module) -> FusedRMSNorm | None:
    """A :class:`FusedRMSNorm` that reproduces ``module`` on a probe input, or ``None``."""
    weight = getattr(module, "weight", None)
    eps = _norm_eps(module)
    if not type(module).__name__.endswith("RMSNorm") or eps is None or list(module.children()):
        return None
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return None
    fused = FusedRMSNorm(weight, eps)
    probe = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.no_grad():
        expected = module(probe.to(weight.dtype)).float()
        got = fused(probe.to(weight.dtype)).float()
    error = (got - expected).norm() / expected.norm().clamp_min(1e-12)
    tolerance = PROBE_TOLERANCE if weight.dtype == torch.float32 else 2e-2
    return fused if error <= tolerance else None


def _replacements(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    """(parent, attribute, original, replacement) for every eligible layer of ``model``."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            adapter = plain_lora_adapter(child)
            new = FusedLoraLinear(child, adapter) if adapter is not None else rms_norm_replacement(child)
            if new is not None:
                found.append((parent, name, child, new))
    return found


@contextmanager
def fused_layers(model: nn.Module, *, enabled: bool) -> Iterator[dict[str, int]]:
    """For the ``with`` block, eligible LoRA linears and RMSNorms of ``model`` run fused (module docstring).

    Yields the counts replaced (``lora_linears``, ``rms_norms``) for the run record. Everything is put back
    on leaving, also on an error, so what is saved afterwards is the PEFT model as built.
    """
    swaps = _replacements(model) if enabled else []
    counts = {
        "lora_linears": sum(isinstance(new, FusedLoraLinear) for *_, new in swaps),
        "rms_norms": sum(isinstance(new, FusedRMSNorm) for *_, new in swaps),
    }
    try:
        for parent, name, _, new in swaps:
            setattr(parent, name, new)
        yield counts
    finally:
        for parent, name, old, _ in swaps:
            setattr(parent, name, old)
