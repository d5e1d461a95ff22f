"""Summed cross-entropy over trained tokens only, without materialising logits for the prompt.

Completion-only data trains a handful of tokens per example (a label and its end-of-turn token), while the
output head over a 49k vocabulary is a fifth of a small model's compute. Gathering the hidden states of
trained positions before the head computes logits only where loss is taken.

The loss is returned as a *sum* with its token count; the caller divides by the trained tokens of the
whole accumulated batch, so gradient accumulation never changes the loss.

When many tokens are trained (long answers, long sequences), the fp32 logits of all of them would be the
largest tensor of the step (2,048 tokens x 128k vocabulary = 1 GiB, several times over for the softmax and
its gradient). Above :data:`LOGIT_ELEMENTS_PER_CHUNK` logits :func:`head_loss` runs the head and loss in
chunks: for a plain linear head the fused linear cross-entropy (:mod:`tuneloop.train.fast.linear_ce`:
gradients taken in the forward pass, the head never recomputed); for a head of another kind (an adapter on
the head, a quantized head) :func:`chunked_head_loss`, whose chunks are checkpointed and recomputed in the
backward pass. Either way at most one chunk's logits exist at a time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneloop.data.render import IGNORE_INDEX
from tuneloop.train.fast.linear_ce import (
    LogitGrad,
    compiled_logit_grad,
    fused_linear_cross_entropy,
    loss_and_logit_grad,
)
from tuneloop.train.fast.packing import model_inputs

LOGIT_ELEMENTS_PER_CHUNK = 1 << 26  # 64M logits: 256 MiB in fp32 per copy


def chunk_tokens(vocab_size: int) -> int:
    """Trained positions per head/loss chunk for a vocabulary (also used by the memory estimate)."""
    return max(128, LOGIT_ELEMENTS_PER_CHUNK // max(vocab_size, 1))


def _head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)``; above ``chunk`` rows, in checkpointed chunks."""
    if hidden.shape[0] <= chunk or not torch.is_grad_enabled():
        return _head_loss(head, hidden, targets)
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        piece = slice(start, start + chunk)
        total = total + checkpoint(_head_loss, head, hidden[piece], targets[piece], use_reentrant=False)
    return total


def head_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    *,
    logit_grad: LogitGrad | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``targets``, ``chunk`` rows at a time.

    Up to ``chunk`` rows: one plain head + cross-entropy (on the CPU the fused path measured 3-20% slower
    there: 16-256 rows, 49k vocabulary). Above: fused for a plain ``nn.Linear`` head (exactly that class:
    subclasses such as quantized layers compute something else from their weight; 36% faster than the
    checkpointed chunks at 2,048 rows on the CPU), otherwise checkpointed chunks. ``logit_grad``: the fused
    path's elementwise step (default eager; :func:`~tuneloop.train.fast.linear_ce.compiled_logit_grad`).
    """
    if hidden.shape[0] > chunk and type(head) is nn.Linear:
        step = logit_grad or loss_and_logit_grad
        return fused_linear_cross_entropy(
            hidden, head.weight, targets, bias=head.bias, chunk_rows=chunk, logit_grad=step
        )
    return chunked_head_loss(head, hidden, targets, chunk)


def _backbone_and_head(model: Any) -> tuple[nn.Module, nn.Module] | None:
    """The decoder stack and output head of a causal LM (PEFT-wrapped or not), if it exposes them."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        return None  # the head is not a plain linear map there; use the model's own forward
    get_decoder = getattr(inner, "get_decoder", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if get_decoder is None or head is None:
        return None
    return get_decoder(), head


class TrainedTokenLoss(nn.Module):
    """Wraps a causal LM; ``forward(batch)`` returns ``(summed loss, trained token count)``.

    It is a module, not a function, so accelerate/DDP can wrap the whole loss computation and gradient
    hooks see one forward. ``compiled``: the head's loss runs its elementwise step compiled (set where the
    decoder layers compile: ``kernels: compile``).
    """

    def __init__(self, model: nn.Module, *, compiled: bool = False) -> None:
        super().__init__()
        self.model = model
        self.parts = _backbone_and_head(model)  # (decoder, head), or None: the model's own forward is used
        self.chunk = chunk_tokens(self.parts[1].weight.shape[0]) if self.parts is not None else 0
        self.logit_grad = compiled_logit_grad() if compiled else loss_and_logit_grad

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
        max_length: int | None = None,
        pad_tokens: int = 0,
        trained_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A padded batch (``attention_mask``) or a packed row (``position_ids``, ``cu_seq_lens``,
        ``max_length``, ``trained_positions``: :func:`tuneloop.train.fast.packing.pack`); the loss is the same
        for the same examples. ``pad_tokens`` (a packed row padded to a CUDA-graph bucket) needs nothing here:
        padding has no labels."""
        inputs = model_inputs(input_ids, attention_mask, position_ids, cu_seq_lens, max_length)
        targets = labels[:, 1:]
        count = (targets != IGNORE_INDEX).sum()
        if self.parts is None:
            logits = self.model(**inputs).logits
            rows, picked = trained_rows(logits, labels, trained_positions)
            loss = F.cross_entropy(rows.float(), picked, reduction="sum")
        else:
            decoder, head = self.parts
            hidden = decoder(**inputs).last_hidden_state
            rows, picked = trained_rows(hidden, labels, trained_positions)
            loss = head_loss(head, rows, picked, self.chunk, logit_grad=self.logit_grad)
        return loss, count


def trained_rows(
    per_position: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_position`` (``[rows, length, ...]``) where it predicts a trained label, and those labels.

    With ``positions`` (:func:`~tuneloop.train.batching.trained_positions`) it is an indexed gather. Without,
    a boolean mask on the device, whose size the host must read back: it waits there for every layer queued
    before it, twice a step (the gather, then its backward), and the GPU idles until the host has queued work
    again.
    """
    if positions is None:
        keep = labels[:, 1:] != IGNORE_INDEX
        return per_position[:, :-1][keep], labels[:, 1:][keep]
    flat = per_position.flatten(0, 1)
    return flat.index_select(0, positions), labels.flatten().index_select(0, positions + 1)
