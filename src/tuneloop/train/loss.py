"""Summed cross-entropy over trained tokens only, without materialising logits for the prompt.

Completion-only data trains a handful of tokens per example (a label and its end-of-turn token), while the
output head over a 49k vocabulary is a fifth of a small model's compute. Gathering the hidden states of
trained positions before the head computes logits only where loss is taken.

The loss is returned as a *sum* with its token count; the caller divides by the trained tokens of the
whole accumulated batch, so gradient accumulation never changes the loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneloop.data.render import IGNORE_INDEX


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
    hooks see one forward.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._parts = _backbone_and_head(model)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        count = keep.sum()
        if self._parts is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            selected = logits[keep]
        else:
            decoder, head = self._parts
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            selected = head(hidden[:, :-1][keep])
        loss = F.cross_entropy(selected.float(), targets[keep], reduction="sum")
        return loss, count
