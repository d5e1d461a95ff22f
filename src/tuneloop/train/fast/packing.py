"""Padding-free batches: a micro-batch's examples laid end to end in one row.

Completion-only SFT data is short and uneven (a ticket of 30 tokens beside one of 300); right-padding a batch
to its longest example spends most of the attention and MLP compute on padding. Packing concatenates the same
examples into one ``[1, T]`` row where ``T`` is their total length, and describes where each begins:

* ``position_ids`` restart at 0 for every example, so RoPE sees exactly the positions it sees when padded;
* ``cu_seq_lens`` (int32, ``[n + 1]``, the cumulative lengths) and ``max_length`` are what varlen attention
  (:mod:`tuneloop.train.fast.attention`) needs to keep attention inside each example;
* the label of each example's first token is masked: after the causal shift it would be the target of the
  *previous* example's last token, a prediction across the boundary that the padded layout never makes.

``max_length`` is an upper bound, not the batch's own longest example: under compiled layers
(:mod:`tuneloop.train.fast.compile`) a Python int that changes from batch to batch is a value dynamo may
specialise on, i.e. a recompile per batch. A run therefore passes one bound for all its batches (its
``max_seq_len``); the flash varlen kernel only sizes its grid by it, blocks past an example's end exit at once.

The batch holds the same examples as the padded one (``epoch_batches`` is unchanged), so the loss, the
trained-token count and therefore the gradient are the same; only the layout differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tuneloop.data.render import IGNORE_INDEX
from tuneloop.data.types import EncodedExample
from tuneloop.train.batching import collate


def pack(examples: Sequence[EncodedExample], max_length: int | None = None) -> dict[str, Any]:
    """One row of the examples end to end, with per-example positions and boundaries (no padding).

    ``max_length``: the bound reported to attention (see the module docstring); default the longest example.
    """
    if not examples:
        raise ValueError("cannot pack an empty batch")
    lengths = [len(e.input_ids) for e in examples]
    if max_length is not None and max(lengths) > max_length:
        raise ValueError(f"an example of {max(lengths)} tokens is longer than the packing bound {max_length}")
    input_ids = torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.long)
    labels = torch.tensor([t for e in examples for t in e.labels], dtype=torch.long)
    cu_seq_lens = torch.zeros(len(examples) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), dim=0)
    labels[cu_seq_lens[:-1].long()] = IGNORE_INDEX  # no target across a boundary (see the module docstring)
    position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
    return {
        "input_ids": input_ids.unsqueeze(0),
        "labels": labels.unsqueeze(0),
        "position_ids": position_ids.unsqueeze(0),
        "cu_seq_lens": cu_seq_lens,
        "max_length": max(lengths) if max_length is None else max_length,
    }


def batch_collator(
    packing: bool, pad_token_id: int, max_length: int | None = None
) -> Callable[[Sequence[EncodedExample]], dict[str, Any]]:
    """The layout a run's batches use: packed rows (``max_length``: the run's one bound, its ``max_seq_len``),
    or right-padded rows (the default)."""
    if packing:
        return lambda examples: pack(examples, max_length)
    return lambda examples: collate(examples, pad_token_id)


def model_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cu_seq_lens: torch.Tensor | None,
    max_length: int | None,
) -> dict[str, Any]:
    """Keyword arguments of the model's forward for a batch in either layout.

    A packed row passes no attention mask (with one, transformers would build a dense ``[T, T]`` mask); its
    boundaries travel as the varlen keywords transformers forwards to the attention function. Even under
    plain ``sdpa`` the row stays correct: transformers then builds a block mask from the restarting positions.

    ``use_cache=False`` always: a training or validation forward never reads a KV cache, and building one
    (transformers does whenever the config's ``use_cache`` is on, as in most released models) costs memory
    and, under compiled layers, one graph *per layer*: each layer writes the cache at its own ``layer_idx``,
    a constant dynamo guards on, so a 30-layer model ran past dynamo's recompile limit (issue 7, workload c).
    """
    if cu_seq_lens is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    return {
        "input_ids": input_ids,
        "use_cache": False,
        "position_ids": position_ids,
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }
