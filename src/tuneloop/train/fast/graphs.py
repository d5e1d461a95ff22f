"""CUDA graphs of the packed training step: one forward+loss+backward graph per row-length bucket.

Why: a small model is bound by kernel launches, not by the GPU. One eager step of the embedded 135M model
at 128 examples (~7,000 tokens, LoRA on every linear layer) launches ~7,900 kernels and dispatches ~19,000
ATen ops from Python; measured on the H200 the GPU was busy 54 ms of each 260 ms step (issue 7, workload c).
A CUDA graph records the step's kernels once and replays them with one launch, so the step costs what the GPU
needs, not what the host needs to ask for it.

How, with torch's own ``torch.cuda.make_graphed_callables`` (no capture code of our own):

* **Static shapes.** A graph replays fixed shapes. Packed rows vary in length, so the collator pads each row
  up to a bucket (:class:`~tuneloop.train.fast.packing.RowBuckets`) with padding segments that attend only
  among themselves and carry no labels, and the loss is taken over every position with ignored targets
  instead of gathering the trained positions (a gather's size is data, which a graph cannot have).
  :func:`plan_buckets` picks the bucket lengths from the run's own rows, weighing the padding a bucket adds
  against the capture a further bucket costs (about one eager step, i.e. ``CAPTURE_COST_ROWS`` replays).
* **Capture on first sighting.** The run's first step is eager: it initialises what a capture must not
  (cuBLAS workspaces, kernels' lazy set-up). After it, a shape is captured the first time it is seen;
  capturing costs about what running the step eagerly costs, so even a shape seen once (an epoch's last,
  short batch) loses nothing by it.
* **One memory pool** for all shapes: the graphs run one after another, never interleaved, so the memory one
  bucket's activations use is reused by the next.

What the graph computes is what the eager step computes: the same decoder call (the packed varlen attention
with the run's ``max_length`` bound), the same autocast dtype (its weight cache off, as capture requires), the
same summed loss (:func:`~tuneloop.train.loss.head_loss`); the autograd node it returns feeds each trainable
weight's gradient into ``.grad`` as the eager backward would, so accumulation, clipping and the optimizer are
unchanged. The GPU test compares losses and gradients with the eager step.

Not graphed, by decision: padded batches (their shapes are the batch's longest example), validation (no
backward), several processes (gradient sync runs in the backward pass), offloaded checkpoints (host copies on a
side stream) and compiled layers (a compiled layer already launches few kernels; its graphs are Inductor's
business).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tuneloop.train.fast.packing import RowBuckets, model_inputs
from tuneloop.train.loss import TrainedTokenLoss, head_loss

SMALLEST_BUCKET = 128  # bucket lengths are multiples of this
# a capture costs about one eager step, and one eager step of the 135M model about ten replays of its graph
# (H200: ~0.29 s against ~0.03 s at 64 examples a step); a further bucket must save that much padding
CAPTURE_COST_ROWS = 10
# the run's first step has already initialised what a capture must not (cuBLAS handles, kernels' lazy set-up);
# torch's default of 3 more eager passes would cost ~0.2 s each per shape on the 135M model
CAPTURE_WARMUP_ITERS = 0


def plan_buckets(
    row_lengths: Sequence[int],
    max_length: int,
    *,
    quantum: int = SMALLEST_BUCKET,
    capture_cost_rows: float = CAPTURE_COST_ROWS,
) -> tuple[int, ...]:
    """Bucket lengths (multiples of ``quantum``) for rows of ``row_lengths`` tokens that minimise padded tokens
    plus ``capture_cost_rows`` mean rows per bucket, exactly (dynamic programming over the rows' own lengths).

    The buckets must leave room for the padding segments their widest gap needs (:class:`RowBuckets`), which
    depend on the buckets: planned again with that room until it suffices (it grows, so this ends).
    """
    if not row_lengths:
        raise ValueError("no rows to plan buckets for")
    penalty = capture_cost_rows * sum(row_lengths) / len(row_lengths)
    room = 1
    while True:
        counts = Counter(math.ceil((n + room) / quantum) * quantum for n in row_lengths)
        lengths = sorted(counts)
        best = [0.0] + [math.inf] * len(lengths)  # best[i]: cost of the i shortest lengths, the i-th a bucket top
        cut = [0] * (len(lengths) + 1)
        for i in range(1, len(lengths) + 1):
            rows = 0
            for k in range(i - 1, -1, -1):  # the bucket ending at lengths[i-1] takes lengths[k:i]
                rows += counts[lengths[k]]
                cost = best[k] + penalty + lengths[i - 1] * rows
                if cost < best[i]:
                    best[i], cut[i] = cost, k
        tops, i = [], len(lengths)
        while i:
            tops.append(lengths[i - 1])
            i = cut[i]
        buckets = RowBuckets(tuple(reversed(tops)), max_length, pad_token_id=0)
        if buckets.segments <= room:
            return buckets.lengths
        room = buckets.segments


class _PackedRowLoss(nn.Module):
    """The summed loss of one padded packed row, with tensor-only arguments (what a graph can take).

    Holds the decoder and head as submodules so that their trainable weights are the graph's inputs; they are
    the model's own modules, shared, not copies.
    """

    def __init__(self, decoder: nn.Module, head: nn.Module, chunk: int, max_length: int, dtype: torch.dtype | None):
        super().__init__()
        self.decoder, self.head = decoder, head
        self.chunk, self.max_length, self.dtype = chunk, max_length, dtype

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, cu_seq_lens: torch.Tensor
    ) -> torch.Tensor:
        inputs = model_inputs(input_ids, None, position_ids, cu_seq_lens, self.max_length)
        with torch.autocast("cuda", dtype=self.dtype or torch.float32, enabled=self.dtype is not None, cache_enabled=False):
            hidden = self.decoder(**inputs).last_hidden_state
            return head_loss(self.head, hidden[0, :-1], labels[0, 1:], self.chunk)


class PackedStepGraphs:
    """``objective.forward`` for packed, bucket-padded rows: replays a captured graph when the row's shape has one.

    ``loss``: the run's :class:`TrainedTokenLoss` (its decoder and head are graphed; shapes with no graph yet,
    and everything without gradients, go through it eagerly). ``autocast_dtype``: the step's autocast dtype.
    """

    def __init__(self, loss: TrainedTokenLoss, *, autocast_dtype: torch.dtype | None) -> None:
        parts = loss.parts
        if parts is None:
            raise ValueError("CUDA graphs need a model whose decoder and output head tuneloop can call separately")
        self._loss = loss
        self._decoder, self._head = parts
        self._dtype = autocast_dtype
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple[int, ...], Callable[..., torch.Tensor]] = {}
        self._warm = False  # one eager step has run
        self.capture_seconds = 0.0
        self.replays = 0

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def __call__(self, module: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The summed loss of ``batch`` (a device batch from the packing collator)."""
        if batch.get("cu_seq_lens") is None or not torch.is_grad_enabled():
            return module(**batch)[0]
        args = (batch["input_ids"], batch["labels"], batch["position_ids"], batch["cu_seq_lens"])
        shape = (*args[0].shape, args[3].numel(), int(batch["max_length"]))
        graphed = self._graphs.get(shape)
        if graphed is None:
            if not self._warm:
                self._warm = True
                return module(**batch)[0]
            graphed = self._capture(shape, args, int(batch["max_length"]))
        self.replays += 1
        return graphed(*args).clone()  # the graph's output buffer is rewritten by the next replay

    def _capture(self, shape: tuple[int, ...], args: tuple[torch.Tensor, ...], max_length: int) -> Callable[..., torch.Tensor]:
        started = time.perf_counter()
        row_loss = _PackedRowLoss(self._decoder, self._head, self._loss.chunk, max_length, self._dtype)
        sample = tuple(a.clone() for a in args)  # the graph's own input buffers; each replay copies into them
        # torch refuses to capture under an autocast that caches casts (the step's); the row loss sets its own
        with torch.autocast("cuda", enabled=False):
            graphed = torch.cuda.make_graphed_callables(
                row_loss, sample, num_warmup_iters=CAPTURE_WARMUP_ITERS, pool=self._pool
            )
        self._graphs[shape] = graphed
        self.capture_seconds += time.perf_counter() - started
        return graphed

    def summary(self) -> dict[str, Any]:
        """For the run record: how many shapes were captured, how many steps replayed one, and the capture cost."""
        return {"graphs": self.captured, "replays": self.replays, "capture_seconds": round(self.capture_seconds, 2)}


def plan_step_graphs(config: Any, device: torch.device, processes: int, kernels: str, offload: bool) -> tuple[bool, str]:
    """Whether an SFT run replays its packed steps as CUDA graphs, and the reason it records (``cuda_graphs``)."""
    if not config.cuda_graphs:
        return False, ""
    refusal = next(
        (why for refused, why in (
            (device.type != "cuda", "needs a CUDA GPU"),
            (processes > 1, "several processes sync gradients inside the backward pass"),
            (offload, "offloaded checkpoints copy to the host on a side stream"),
            (kernels == "compile", "compiled layers (set kernels: eager or auto)"),
        ) if refused),
        None,
    )  # fmt: skip
    if refusal is not None:
        return False, f"cuda_graphs: off, {refusal}"
    return True, "cuda_graphs: packed steps replayed as CUDA graphs, one per row-length bucket"
