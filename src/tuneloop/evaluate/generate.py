"""Batched greedy generation: left padding, KV cache, stop at the end-of-turn token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


@torch.inference_mode()
def generate_greedy(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    stop_token_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Generate for every prompt; returns the new token ids per prompt, in input order.

    Prompts are batched by length (longest first, so memory peaks early and padding stays small) and left
    padded, which keeps every prompt's last token at the same position for the KV-cached decode.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            ids = prompts[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(stop_token_ids),
            pad_token_id=pad_token_id,
        )
        for row, index in enumerate(chunk):
            new = output[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stop_token_ids), len(new))
            results[index] = new[:cut]
        if on_batch is not None:
            on_batch(len(chunk))
    return results
