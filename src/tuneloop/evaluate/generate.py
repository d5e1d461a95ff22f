"""Batched greedy generation: left padding, KV cache, stop at the end-of-turn token, shared prompt prefix.

Prompts are batched by length (longest first, so memory peaks early and padding stays small). When every
prompt starts with the same tokens (the system prompt; for the few-shot baseline, all the shots), that
prefix is run through the model once and its KV cache is copied into each batch: the few-shot baseline
then costs about as much as zero-shot. The padding of a batch sits between the shared prefix and each
prompt's own tokens, masked out; positions come from the attention mask, so every real token keeps the
position it would have without padding.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

MIN_SHARED_PREFIX = 8  # below this, copying the cache costs about what it saves


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens all prompts share at the start, leaving each at least one token of its own to start from."""
    if len(prompts) < 2:
        return 0
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    length = 0
    while length < shortest - 1 and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


def _cache_keyword(model: Any) -> str:
    """Newer transformers call the KV-cache argument ``cache``, older ones ``past_key_values``; the model's
    own ``forward`` signature says which (a PEFT wrapper is looked through)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


@torch.inference_mode()
def _prefill(model: Any, ids: Sequence[int], device: torch.device, keyword: str) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, **{keyword: cache})
    return cache


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
    share_prefix: bool = True,
) -> list[list[int]]:
    """Generate for every prompt; returns the new token ids per prompt (up to the stop token), in input order."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    prefix = common_prefix_length(prompts) if share_prefix else 0
    prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
    prefix_ids = list(prompts[0][:prefix])
    cache_keyword = _cache_keyword(model) if prefix else ""
    prefix_cache = _prefill(model, prefix_ids, device, cache_keyword) if prefix else None

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        input_ids[:, :prefix] = torch.tensor(prefix_ids, dtype=torch.long)
        attention[:, :prefix] = 1
        for row, index in enumerate(chunk):
            own = prompts[index][prefix:]
            input_ids[row, width - len(own) :] = torch.tensor(own)
            attention[row, width - len(own) :] = 1
        extra: dict[str, Any] = {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(chunk))
            extra[cache_keyword] = cache
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(stop_token_ids),
            pad_token_id=pad_token_id,
            use_cache=True,
            **extra,
        )
        for row, index in enumerate(chunk):
            new = output[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stop_token_ids), len(new))
            results[index] = new[:cut]
        if on_batch is not None:
            on_batch(len(chunk))
    return results
