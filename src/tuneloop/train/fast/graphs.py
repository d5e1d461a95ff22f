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
  :func:`bucket_tokens` picks the bucket width from the run's own batches so that a run has a handful of
  shapes; the padding costs a few percent of the compute.
* **Capture on the second sighting.** A shape is run eagerly the first time it is seen, and captured when it
  comes back; a shape seen once (an epoch's last, short batch) never pays for a capture, and the eager run
  is also the warm-up the capture needs (cuBLAS workspaces, lazy initialisation).
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

from tuneloop.train.fast.packing import model_inputs
from tuneloop.train.loss import TrainedTokenLoss, head_loss

MAX_BUCKETS = 8
SMALLEST_BUCKET = 128
# the eager run of a shape's first sighting has already initialised what a capture must not (cuBLAS handles,
# kernels' lazy set-up); torch's default of 3 more eager passes would cost ~0.2 s each per shape on the 135M model
CAPTURE_WARMUP_ITERS = 0


def bucket_tokens(row_lengths: Sequence[int], max_buckets: int = MAX_BUCKETS, smallest: int = SMALLEST_BUCKET) -> int:
    """The narrowest power-of-two bucket width (>= ``smallest``) that puts ``row_lengths`` into at most
    ``max_buckets`` distinct padded lengths: fewer captures against less padding."""
    width = smallest
    while len({math.ceil(n / width) for n in row_lengths}) > max_buckets:
        width *= 2
    return width


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
        self._seen: Counter[tuple[int, ...]] = Counter()
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
            self._seen[shape] += 1
            if self._seen[shape] < 2:
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
