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
"""

from __future__ import annotations

import torch

from tuneloop.data.render import IGNORE_INDEX


def linear_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul precision autocast would use for ``F.linear(hidden, weight)``, or the promoted dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = rows @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.float()


def _chunk_loss(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp and the chunk's summed cross-entropy over valid rows (fp32)."""
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return lse, torch.where(valid, lse - picked, 0.0).sum()


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_rows: int,
    ignore_index: int,
    want: tuple[bool, bool, bool],
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
            lse, loss = _chunk_loss(logits, chunk_targets, valid)
            total += loss
            if not any(want):
                continue
            # d(sum CE)/d logits = softmax - one_hot(target), zero on ignored rows; built in place
            grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()
            grad_logits[
                torch.arange(len(chunk_targets), device=logits.device), chunk_targets.clamp(min=0)
            ] -= 1.0
            grad_logits.mul_(valid.unsqueeze(1))
            low = grad_logits.to(dtype)
            del logits, grad_logits
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
    ) -> torch.Tensor:
        want = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        total, *grads = _chunked(hidden, weight, bias, targets, chunk_rows, ignore_index, want)
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
        return grads[0], grads[1], grads[2], None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_rows: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, without full logits.

    ``hidden``: ``[rows, hidden]``; ``weight``: ``[vocab, hidden]`` (an ``nn.Linear`` head's weight);
    ``targets``: ``[rows]``, rows equal to ``ignore_index`` add nothing. At most ``chunk_rows x vocab``
    logits exist at a time. The matmul runs in autocast's dtype when autocast is on (as the head would),
    the softmax in fp32. Returns an fp32 scalar; differentiable in ``hidden``, ``weight`` and ``bias``.
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
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, ignore_index)
