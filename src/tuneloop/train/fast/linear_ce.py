"""Fused linear cross-entropy: the output head and its loss, chunk by chunk, gradients taken in the forward pass.

The head of a 128k-vocabulary model turns every trained position into 128k logits; kept in fp32 for the
softmax, 4,096 trained tokens are 2 GiB, and autograd keeps them (and their softmax) until the backward pass.
The older answer, :func:`tuneloop.train.loss.chunked_head_loss`, checkpoints chunks: one chunk's logits exist
at a time, but every chunk's matmul runs twice (forward, then recomputed in the backward pass).

Here each chunk of rows computes its logits once, takes the summed cross-entropy (fp32 log-sum-exp), and
while the logits are at hand turns them into their gradient (softmax minus one-hot), from which the
gradients of the hidden states (and of the head's weight and bias when they are trained, e.g. full
fine-tuning) follow by two matmuls. Only those gradients are kept: ``[rows, hidden]`` for the hidden states,
the size of the weight for the weight. The backward pass multiplies them by the incoming scalar gradient, so
it costs nothing and the head is never recomputed. This is the approach of Liger-Kernel's and Apple's
"cut cross-entropy"-style losses, written in plain PyTorch so it runs wherever the model runs.

The catch: gradients are computed even if the loss is never backpropagated. :func:`fused_linear_cross_entropy`
therefore takes the plain loss-only path (still chunked) under ``torch.no_grad`` or when nothing needs a
gradient.

Between a chunk's two matmuls sits elementwise work over ``rows x vocab`` values (:func:`loss_and_logit_grad`).
Eagerly that is about ten kernels, each reading and writing the chunk in fp32: about 10 ms of a 370 ms step of
an 8B model (4,096 tokens, 128k vocabulary) on the H200. Where the layers run compiled, the same function runs
through ``torch.compile`` (:func:`compiled_logit_grad`); Inductor's kernels for it took 1.4 ms there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tuneloop.data.render import IGNORE_INDEX

LogitGrad = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]
]


def linear_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul precision autocast would use for ``F.linear(hidden, weight)``, or the promoted dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The chunk's logits in the matmul dtype (the softmax upcasts)."""
    logits = rows @ weight.t()
    return logits + bias if bias is not None else logits


def _chunk_loss(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp and the chunk's summed cross-entropy over valid rows (fp32)."""
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return lse, torch.where(valid, lse - picked, 0.0).sum()


def loss_and_logit_grad(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, grad_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's summed cross-entropy (fp32) and its gradient w.r.t. the logits, in ``grad_dtype``:
    softmax minus one-hot, zero on ignored rows. Written in place, so that eagerly one fp32 copy of the chunk
    exists at a time; :func:`compiled_logit_grad` compiles this same function."""
    logits = logits.float()
    lse, loss = _chunk_loss(logits, targets, valid)
    grad = logits.sub_(lse.unsqueeze(1)).exp_()
    grad[torch.arange(len(targets), device=grad.device), targets.clamp(min=0)] -= 1.0
    grad.mul_(valid.unsqueeze(1))
    return loss, grad.to(grad_dtype)


def compiled_logit_grad() -> LogitGrad:
    """:func:`loss_and_logit_grad` through ``torch.compile`` (compiled on first use; dynamo's cache is on the
    function's code, so every caller shares its graphs: one for the full chunks, one for a shorter last one)."""
    return torch.compile(loss_and_logit_grad, fullgraph=True)


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_rows: int,
    ignore_index: int,
    want: tuple[bool, bool, bool],
    logit_grad: LogitGrad = loss_and_logit_grad,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The summed loss, chunk by chunk, and the gradients ``want`` asks for (hidden, weight, bias), taken in the
    same pass so no chunk's logits are computed twice. With nothing wanted it is the loss alone (validation)."""
    dtype = linear_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and want[2] else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start : start + chunk_rows].to(dtype)
            chunk_targets = targets[start : start + chunk_rows]
            valid = chunk_targets != ignore_index
            logits = _chunk_logits(rows, w, b)
            if not any(want):
                total += _chunk_loss(logits.float(), chunk_targets, valid)[1]
                continue
            loss, low = logit_grad(logits, chunk_targets, valid, dtype)
            total += loss
            del logits
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_rows] = low @ w
            if grad_weight is not None:
                grad_weight += (low.t() @ rows).float()
            if grad_bias is not None:
                grad_bias += low.float().sum(0)
    return total, grad_hidden, grad_weight, grad_bias


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed CE of ``hidden @ weight.T (+ bias)``; the forward pass also computes the input gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_rows: int,
        ignore_index: int,
        logit_grad: LogitGrad,
    ) -> torch.Tensor:
        want = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        total, *grads = _chunked(hidden, weight, bias, targets, chunk_rows, ignore_index, want, logit_grad)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in grads))
        ctx.present = tuple(t is not None for t in grads)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor):  # type: ignore[override]
        stored = ctx.saved_tensors
        grads = []
        for tensor, present, dtype in zip(stored, ctx.present, ctx.dtypes):
            grads.append((tensor * grad_output).to(dtype) if present else None)
        return grads[0], grads[1], grads[2], None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_rows: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    logit_grad: LogitGrad = loss_and_logit_grad,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, without full logits.

    ``hidden``: ``[rows, hidden]``; ``weight``: ``[vocab, hidden]`` (an ``nn.Linear`` head's weight);
    ``targets``: ``[rows]``, rows equal to ``ignore_index`` add nothing. At most ``chunk_rows x vocab``
    logits exist at a time. The matmul runs in autocast's dtype when autocast is on (as the head would),
    the softmax in fp32. Returns an fp32 scalar; differentiable in ``hidden``, ``weight`` and ``bias``.
    ``logit_grad``: the elementwise step between the matmuls (:func:`compiled_logit_grad` where layers compile).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be [rows, width] and targets [rows]; got {tuple(hidden.shape)}, {tuple(targets.shape)}"
        )
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    needs_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not (torch.is_grad_enabled() and needs_grad):
        with torch.no_grad():  # validation and evaluation: the same chunked loss, no gradients kept
            return _chunked(hidden, weight, bias, targets, chunk_rows, ignore_index, (False, False, False))[0]
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, ignore_index, logit_grad)
