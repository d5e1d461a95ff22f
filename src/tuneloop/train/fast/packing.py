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

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tuneloop.data.render import IGNORE_INDEX
from tuneloop.data.types import EncodedExample
from tuneloop.train.batching import collate, trained_positions


@dataclass(frozen=True)
class RowBuckets:
    """Row lengths a packed row is padded up to, so that a run sees a few shapes (CUDA graphs replay one per shape).

    ``lengths``: the bucket lengths, ascending (:func:`tuneloop.train.fast.graphs.plan_buckets` picks them from
    the run's rows). A row of ``T`` tokens becomes the shortest bucket that leaves room for ``segments``
    padding segments of 1 to ``max_length`` tokens each; a row past the longest bucket is padded on in steps
    of the widest gap between buckets. Padding is split into segments, not left as one, so every segment stays
    within the attention bound ``max_length`` and none is empty; a fixed number of them keeps ``cu_seq_lens``
    one length for every full batch. Padding tokens are ``pad_token_id`` with no label: they attend only among
    themselves and add nothing to the loss or its gradient.
    """

    lengths: tuple[int, ...]
    max_length: int
    pad_token_id: int

    def __post_init__(self) -> None:
        if not self.lengths or any(b <= a for a, b in zip((0, *self.lengths), self.lengths)):
            raise ValueError(f"bucket lengths must be positive and ascending, got {self.lengths}")

    @property
    def widest_gap(self) -> int:
        return max(b - a for a, b in zip((0, *self.lengths), self.lengths))

    @property
    def segments(self) -> int:
        # a row just past one bucket pads up to the next: at most widest_gap + segments - 1 tokens, which split
        # into this many parts of <= max_length
        return max(1, math.ceil((self.widest_gap - 1) / max(self.max_length - 1, 1)))

    def padded_length(self, tokens: int) -> int:
        needed = tokens + self.segments
        index = bisect.bisect_left(self.lengths, needed)
        if index < len(self.lengths):
            return self.lengths[index]
        top, step = self.lengths[-1], self.widest_gap
        return top + math.ceil((needed - top) / step) * step

    def padding_segments(self, tokens: int) -> list[int]:
        padding = self.padded_length(tokens) - tokens
        base, extra = divmod(padding, self.segments)
        return [base + 1] * extra + [base] * (self.segments - extra)


def pack(
    examples: Sequence[EncodedExample], max_length: int | None = None, buckets: RowBuckets | None = None
) -> dict[str, Any]:
    """One row of the examples end to end, with per-example positions and boundaries.

    ``max_length``: the bound reported to attention (see the module docstring); default the longest example.
    ``buckets``: pad the row up to a bucket length (:class:`RowBuckets`); ``pad_tokens`` says how many tokens
    of the row are padding (0 without buckets).
    """
    if not examples:
        raise ValueError("cannot pack an empty batch")
    lengths = [len(e.input_ids) for e in examples]
    if max_length is not None and max(lengths) > max_length:
        raise ValueError(f"an example of {max(lengths)} tokens is longer than the packing bound {max_length}")
    ids = [t for e in examples for t in e.input_ids]
    targets = [t for e in examples for t in e.labels]
    segments = list(lengths)
    if buckets is not None:
        padding = buckets.padding_segments(len(ids))
        ids += [buckets.pad_token_id] * sum(padding)
        targets += [IGNORE_INDEX] * sum(padding)
        segments += padding
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.tensor(targets, dtype=torch.long)
    cu_seq_lens = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.cumsum(torch.tensor(segments, dtype=torch.int32), dim=0)
    labels[cu_seq_lens[:-1].long()] = IGNORE_INDEX  # no target across a boundary (see the module docstring)
    position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in segments])
    return {
        "input_ids": input_ids.unsqueeze(0),
        "labels": labels.unsqueeze(0),
        "position_ids": position_ids.unsqueeze(0),
        "cu_seq_lens": cu_seq_lens,
        "max_length": max(lengths) if max_length is None else max_length,
        "pad_tokens": len(ids) - sum(lengths),
        "trained_positions": trained_positions(labels.unsqueeze(0)),
    }


def batch_collator(
    packing: bool, pad_token_id: int, max_length: int | None = None, buckets: RowBuckets | None = None
) -> Callable[[Sequence[EncodedExample]], dict[str, Any]]:
    """The layout a run's batches use: packed rows (``max_length``: the run's one bound, its ``max_seq_len``;
    ``buckets``: row lengths for CUDA graphs), or right-padded rows (the default)."""
    if packing:
        return lambda examples: pack(examples, max_length, buckets)
    return lambda examples: collate(examples, pad_token_id)


def model_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cu_seq_lens: torch.Tensor | None,
    max_length: int | None,
) -> dict[str, Any]:
    """Keyword arguments of the model's forward for a batch in either layout.

    A packed row on the GPU passes no attention mask (with one, transformers would build a dense ``[T, T]``
    mask); its boundaries travel as the varlen keywords transformers forwards to the attention function. On the
    CPU, where attention needs the dense block mask anyway, it is built once here. Even under
    plain ``sdpa`` the row stays correct: transformers then builds a block mask from the restarting positions.

    ``use_cache=False`` always: a training or validation forward never reads a KV cache, and building one
    (transformers does whenever the config's ``use_cache`` is on, as in most released models) costs memory
    and, under compiled layers, one graph *per layer*: each layer writes the cache at its own ``layer_idx``,
    a constant dynamo guards on, so a 30-layer model ran past dynamo's recompile limit (issue 7, workload c).
    """
    if cu_seq_lens is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    inputs = {
        "input_ids": input_ids,
        "use_cache": False,
        "position_ids": position_ids,
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }
    if input_ids.device.type == "cpu":
        # no flash kernel on the host: the block-diagonal causal mask is built here, once per forward, and
        # transformers hands a 4-D mask to every layer as it is (building it per layer took a fifth of a step)
        from tuneloop.train.fast.attention import block_causal_mask, segments_from_boundaries

        inputs["attention_mask"] = block_causal_mask(segments_from_boundaries(cu_seq_lens, input_ids.shape[1]))
    return inputs
