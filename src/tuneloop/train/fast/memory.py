"""Memory-driven selective checkpointing: ``gradient_checkpointing: auto``.

Checkpointing every layer (``true``) trades a third of the compute for memory whether or not the memory was
needed; none (``false``) runs out of memory on long sequences. ``auto`` checkpoints only as many decoder
layers as the memory budget requires, predicted by the same formula as ``tuneloop estimate``
(:class:`tuneloop.train.estimate.MemoryModel`): weights, adapters and optimizer state, per-layer activations
at the longest micro-batch, the head's logits chunk.

Which layers: the *first* ones. The backward pass reaches them last, when every later layer's saved
activations are already freed, so recomputing one of them never adds to the peak (see
:meth:`MemoryModel.at`). How: transformers' own per-layer mechanism (each ``GradientCheckpointingLayer``
instance has a ``gradient_checkpointing`` flag and a ``_gradient_checkpointing_func``; this is what
``gradient_checkpointing_enable`` sets on every layer), set on the chosen instances only.

When even every layer checkpointed does not fit, the checkpointed layers' inputs are kept in pinned host
memory and copied back ahead of each recompute, on a side stream, with the layers still compiled
(:mod:`tuneloop.train.fast.offload`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from tuneloop.config import RunConfig
from tuneloop.train.estimate import GIB, RUNTIME_OVERHEAD_BYTES, MemoryModel, fits_budget
from tuneloop.train.fast.offload import CompiledLayerCall, offloaded_checkpoint_functions

FREE_MEMORY_SHARE = 0.95  # default budget: the memory free at start, less 5%


@dataclass(frozen=True)
class CheckpointPlan:
    """How many of the first decoder layers to checkpoint, and why."""

    checkpointed_layers: int
    total_layers: int
    offload: bool
    predicted_peak: int | None  # bytes; None where no prediction was made (CPU)
    budget: float | None  # bytes
    reason: str
    fits: bool = True  # False only when even offloading is predicted not to fit


def plan_checkpointing(memory: MemoryModel, budget_bytes: float) -> CheckpointPlan:
    """The fewest checkpointed layers whose predicted peak (plus runtime overhead) fits ``budget_bytes``.

    Fewest, because each checkpointed layer costs a recomputed forward pass (about a third of its step
    time). When even every layer checkpointed does not fit, the layers' inputs go to host memory
    (``offload``); if that still does not fit, the reason says so and training will likely run out of memory.
    """
    for k, peak in enumerate(memory.peaks()):
        if fits_budget(peak, budget_bytes):
            what = "no layer needs checkpointing" if k == 0 else f"{k} of {memory.layers} layers checkpointed"
            reason = (
                f"{what}: predicted peak {peak / GIB:.1f} GiB + {RUNTIME_OVERHEAD_BYTES / GIB:.0f} GiB runtime "
                f"overhead within the budget of {budget_bytes / GIB:.1f} GiB"
            )
            return CheckpointPlan(k, memory.layers, False, peak, budget_bytes, reason)
    everything = memory.at(memory.layers).peak
    offloaded = memory.at(memory.layers, offload=True).peak
    fits = fits_budget(offloaded, budget_bytes)
    # the prediction errs high (8B LoRA at a 16.67 GiB budget: 16.72 predicted, 16.38 allocated), so a budget
    # that only the margin overruns is a risk, not a certainty
    verdict = (
        "fits"
        if fits
        else f"with the {RUNTIME_OVERHEAD_BYTES / GIB:.0f} GiB runtime overhead this does NOT fit the budget: "
        "it may run out of memory"
    )
    reason = (
        f"every layer checkpointed ({everything / GIB:.1f} GiB predicted) exceeds the budget of "
        f"{budget_bytes / GIB:.2f} GiB: their inputs are offloaded to host memory, {offloaded / GIB:.2f} GiB "
        f"predicted; {verdict}"
    )
    return CheckpointPlan(memory.layers, memory.layers, True, offloaded, budget_bytes, reason, fits)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated decoder blocks, in order: transformers' ``GradientCheckpointingLayer`` instances.

    The same modules ``gradient_checkpointing_enable`` counts; found by type, so PEFT wrapping, any Llama-like
    architecture and any attribute path (``model.layers``, ``transformer.h``) work alike.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_checkpointing(
    layers: list[torch.nn.Module], count: int, *, offload: bool, pin_memory: bool, run: CompiledLayerCall | None = None
) -> tuple[int, ...]:
    """Checkpoint the first ``count`` of ``layers`` (per-instance flags), the rest not; returns their indices.

    Without offload: torch's non-reentrant checkpoint (frozen embeddings need no gradient). With offload:
    one :class:`~tuneloop.train.fast.offload.OffloadedCheckpoint` per layer, running the layer through
    ``run`` (a compiled trampoline when the layers compile; eager by default).
    """
    if offload:
        functions = offloaded_checkpoint_functions(layers, offload=True, pin_memory=pin_memory, run=run or CompiledLayerCall())
    else:
        functions = [partial(checkpoint, use_reentrant=False)] * len(layers)
    chosen = tuple(range(min(count, len(layers))))
    for index, (layer, function) in enumerate(zip(layers, functions, strict=True)):
        layer.gradient_checkpointing = index < count
        layer._gradient_checkpointing_func = function
    return chosen


def budget_bytes(config: RunConfig, device: torch.device) -> float | None:
    """``memory_budget_gib``, else the memory free when training started less 5% (CUDA only).

    Called after the weights are loaded: what this process has reserved since is added back, so the default
    means "free at start", not "free after loading the model".
    """
    if config.memory_budget_gib is not None:
        return config.memory_budget_gib * GIB
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return FREE_MEMORY_SHARE * (free + torch.cuda.memory_reserved(device))


def memory_model_of(model: Any, config: RunConfig, tokens: int, *, compiled: bool | None = None) -> MemoryModel:
    """The peak formula for ``model`` (its architecture, counted on the meta device) at ``tokens`` per micro-batch;
    ``compiled``: whether its layers run compiled (default: as ``kernels`` would on a GPU)."""
    from tuneloop.train.estimate import ModelShape, memory_model

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    shape = ModelShape.from_hf_config(inner.config)
    weight_bytes = 4.0 if config.precision == "fp32" else 2.0
    return memory_model(config, shape, weight_bytes=weight_bytes, tokens=tokens, compiled=compiled)[0]


def plan_for(
    model: Any,
    config: RunConfig,
    layers: list[torch.nn.Module],
    device: torch.device,
    tokens: int,
    budget: float | None,
    *,
    compiled: bool | None = None,
) -> CheckpointPlan:
    """What ``gradient_checkpointing`` asks for on this device: all, none, or the planner's choice for ``auto``.

    ``compiled``: whether the layers will run compiled (their saved activations are smaller, so ``auto``
    checkpoints fewer of them); default: as ``kernels`` would on a GPU.
    """
    total = len(layers)
    choice = config.gradient_checkpointing
    if choice == "auto" and device.type != "cuda":
        return CheckpointPlan(0, total, False, None, budget, f"auto on {device.type}: no GPU memory to save, none checkpointed")
    try:
        memory = memory_model_of(model, config, tokens, compiled=compiled) if device.type == "cuda" else None
    except Exception as error:  # an architecture the estimate cannot build: plan safely instead of failing the run
        memory = None
        unknown = f"no memory prediction for this architecture ({type(error).__name__}: {error})"
    if choice == "auto":
        if memory is None or budget is None:
            why = unknown if memory is None else "no memory budget known"
            return CheckpointPlan(total, total, False, None, budget, f"auto: {why}; every layer checkpointed")
        return plan_checkpointing(memory, budget)
    count = total if choice else 0
    predicted = memory.at(count).peak if memory is not None else None
    return CheckpointPlan(count, total, False, predicted, budget, f"gradient_checkpointing: {str(choice).lower()}")
