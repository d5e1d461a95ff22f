"""Seeded, resumable batch order and padding.

The order of epoch ``e`` is a pure function of ``(seed, e)``, so a resumed run replays exactly the batches
an uninterrupted one would have seen. Examples of similar length share a batch (sorted within shuffled
chunks), which cuts padding without making the order predictable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tuneloop.data.render import IGNORE_INDEX
from tuneloop.data.types import EncodedExample

SORT_CHUNK_BATCHES = 16


def epoch_batches(examples: Sequence[EncodedExample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of every batch of one epoch, deterministic in ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    chunk = batch_size * SORT_CHUNK_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda i: len(examples[i].input_ids))
        batches += [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def collate(examples: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def trained_tokens(batch: dict[str, Any]) -> int:
    """Tokens that carry loss (after the causal shift: the first position is never a target).

    Right for packed rows too (:mod:`tuneloop.train.fast.packing`): there each example's first label is
    masked, so a row counts what the same examples count when padded.
    """
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where loss is taken, as indices into the flattened ``[rows, length]`` positions: the positions whose
    *next* label is trained. Computed by the collator on the host (:func:`~tuneloop.train.fast.packing.pack`),
    where the labels are, so that :class:`~tuneloop.train.loss.TrainedTokenLoss` gathers with a known size."""
    width = labels.shape[-1]
    row, column = (labels.reshape(-1, width)[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return row * width + column


def real_tokens(batch: dict[str, Any]) -> int:
    """Tokens that are not padding, for throughput: a packed row (no ``attention_mask``) has only the padding
    segments it was given to reach a CUDA-graph bucket (``pad_tokens``)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel() - batch.get("pad_tokens", 0)


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Tensors moved to ``device``; plain values (a packed batch's ``max_length``) stay on the host.

    To a GPU the copy goes from pinned memory without blocking: a copy from pageable memory makes the host
    wait until the GPU has finished everything queued before it, so the next batch could not be prepared
    while the current step runs.
    """
    pinned = torch.device(device).type == "cuda"

    def move(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory().to(device, non_blocking=True) if pinned else tensor.to(device)

    return {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
