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
saved. A layer that is not plain LoRA (DoRA, dropout, a LoRA bias, a trained base, several adapters) keeps
PEFT's forward; a norm is replaced only if the fused op reproduces it on a probe input (a
Gemma-style ``1 + weight`` norm does not, and stays).

Over a bitsandbytes 4-bit base (QLoRA) the same arithmetic runs over a dense weight rebuilt for each matmul and
never saved (:mod:`tuneloop.train.fast.four_bit`); it is what lets QLoRA decoder layers compile. Compiled layers
take the LoRA linears only (``fused_layers_for(model, "compile")``; Inductor fuses the norms itself).

Numerics: the same bf16 operands and fp32 accumulation as PEFT's path, with one rounding fewer (the adapter
term is added before the output is rounded, not after); fp32 runs match PEFT to float rounding (unit test).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneloop.train.fast.four_bit import four_bit_parts, lora_4bit_linear
from tuneloop.train.fast.linear_ce import linear_dtype
from tuneloop.train.fast.lora_matmuls import lora_forward, lora_grads

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
        out, rows, w, a, b, u = lora_forward(
            x, weight, bias, lora_a, lora_b, scaling, linear_dtype(x, weight)
        )
        ctx.save_for_backward(rows, w, a, b, u)
        ctx.scaling = scaling
        ctx.dtypes = (x.dtype, lora_a.dtype, lora_b.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        rows, w, a, b, u = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x, grad_a, grad_b = lora_grads(
            grad_out, rows, w, a, b, u, ctx.scaling, ctx.dtypes, (needs[0], needs[3], needs[4])
        )
        return grad_x, None, None, grad_a, grad_b, None


FOUR_BIT_BUFFERS = ("packed_weight", "absmax", "nested_absmax", "nested_code", "absmax_offset", "nibble_code")


class FusedLoraLinear(nn.Module):
    """A PEFT LoRA linear's forward as :class:`_LoraLinear` (over a bitsandbytes 4-bit base: the same arithmetic
    over a rebuilt weight, :mod:`tuneloop.train.fast.four_bit`), over the layer's own modules and names."""

    def __init__(self, layer: nn.Module, adapter: str) -> None:
        super().__init__()
        self.base_layer = layer.base_layer
        self.lora_A = layer.lora_A
        self.lora_B = layer.lora_B
        self.adapter = adapter
        self.scaling = float(layer.scaling[adapter])
        self.layout = None
        if _is_4bit_linear(self.base_layer):
            # taken once (the loop moves no weights), as non-persistent buffers: nothing is added to the state
            # dict, and torch.compile treats buffer shapes as static (as a plain attribute, an absmax length
            # that happened to equal a sequence length was assumed equal to it, and recompiled)
            tensors, self.layout = four_bit_parts(self.base_layer)
            for name, tensor in zip(FOUR_BIT_BUFFERS, tensors, strict=True):
                self.register_buffer(name, tensor, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        a, b = self.lora_A[self.adapter].weight, self.lora_B[self.adapter].weight
        if self.layout is not None:
            quantized = tuple(getattr(self, name) for name in FOUR_BIT_BUFFERS)
            return lora_4bit_linear(x, quantized, self.layout, base.bias, a, b, self.scaling)
        return _LoraLinear.apply(x, base.weight, base.bias, a, b, self.scaling)


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
    """The adapter name if ``module`` is a PEFT LoRA linear that :class:`FusedLoraLinear` computes exactly:
    PEFT's ``Linear`` over a frozen ``nn.Linear``, or a PEFT LoRA linear over a bitsandbytes 4-bit base."""
    from peft.tuners.lora.layer import Linear

    if not (type(module) is Linear or _is_peft_4bit_lora(module)):
        return None
    # PEFT wraps a 4-bit base in either class (its bitsandbytes one needs CUDA)
    four_bit = _is_4bit_linear(module.base_layer)
    if module.merged or module.disable_adapters or getattr(module, "fan_in_fan_out", False):
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
        and (_is_4bit_linear(base) if four_bit else type(base) is nn.Linear)
        and not base.weight.requires_grad
    )
    return name if plain else None


def _is_4bit_linear(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` whose weight is quantized (checked by name: bitsandbytes is optional)."""
    kind = type(module)
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return kind.__module__.startswith("bitsandbytes.") and kind.__name__ == "Linear4bit" and state is not None


def _is_peft_4bit_lora(module: nn.Module) -> bool:
    kind = type(module)
    return kind.__module__ == "peft.tuners.lora.bnb" and kind.__name__ == "Linear4bit"


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


def _replacements(
    model: nn.Module, *, lora_only: bool = False
) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    """(parent, attribute, original, replacement) for every eligible layer of ``model``; with ``lora_only``
    the LoRA linears only (over dense and 4-bit bases), no norms."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            adapter = plain_lora_adapter(child)
            if adapter is not None:
                found.append((parent, name, child, FusedLoraLinear(child, adapter)))
            elif not lora_only and (norm := rms_norm_replacement(child)) is not None:
                found.append((parent, name, child, norm))
    return found


@contextmanager
def fused_layers(model: nn.Module, *, enabled: bool, lora_only: bool = False) -> Iterator[dict[str, int]]:
    """For the ``with`` block, eligible LoRA linears and RMSNorms of ``model`` run fused (module docstring);
    with ``lora_only``, the LoRA linears only (what compiled layers take: Inductor fuses the norms itself).

    Yields the counts replaced (``lora_linears``, ``rms_norms``) for the run record. Everything is put back
    on leaving, also on an error, so what is saved afterwards is the PEFT model as built.
    """
    swaps = _replacements(model, lora_only=lora_only) if enabled else []
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


def fused_layers_for(model: nn.Module, kernels: str) -> AbstractContextManager[dict[str, int]]:
    """The swap a training loop makes for the kernel choice in use: every eligible layer under ``fused``;
    under ``compile`` the LoRA linears (Inductor fuses the rest), none under ``eager``.

    Why compiled layers take the fused LoRA linears too: over a 4-bit base it is what lets a QLoRA layer compile
    at all (no bitsandbytes forward is traced); over a dense one, PEFT's ``base(x) + B(A(x)) * s`` compiles to a
    matmul, a second output-sized product, a scaling pass and, for the sum, a copy of the output
    (``Memcpy DtoD``), where the fused linear adds the adapter in cuBLAS's epilogue in place
    (:mod:`tuneloop.train.fast.lora_matmuls`; 0.72 against 0.79 ms for a 4,096 x 4,096 -> 14,336 forward on
    the H200)."""
    return fused_layers(model, enabled=kernels in ("fused", "compile"), lora_only=kernels == "compile")


def unfused_four_bit_layers(layer: nn.Module) -> int:
    """How many bitsandbytes modules of ``layer`` the LoRA swap of compiled layers would leave in place (a 4-bit
    linear without an adapter, or with dropout, DoRA...): compiled layers need none (``fast/compile.py``)."""
    swapped = [child for child in layer.modules() if plain_lora_adapter(child) is not None]
    covered = {id(m) for child in swapped for m in child.modules()}
    return sum(is_bitsandbytes_module(m) and id(m) not in covered for m in layer.modules())


def is_bitsandbytes_module(module: nn.Module) -> bool:
    """A module of bitsandbytes' (by name: bitsandbytes is optional, and imported only for QLoRA)."""
    return type(module).__module__.split(".")[0] == "bitsandbytes"
