"""``apply_fast_path``: the fast-path decisions for one model, taken once after the adapter is applied.

Two decisions, in this order because the second depends on the first:

1. **Which decoder layers are checkpointed** (``gradient_checkpointing``: ``false`` none, ``true`` all,
   ``auto`` the fewest that fit ``memory_budget_gib``; :mod:`tuneloop.train.fast.memory`).
2. **Which kernels run them** (``kernels``: ``compile`` / ``eager`` / ``auto``, a registry in
   :mod:`tuneloop.train.fast.compile`); compiled after the flags are set, so each compiled graph is traced
   with its layer's checkpointing in place.

The plan counts compiled layers' smaller activations when the layers are expected to compile; should the
compile probe fall back to eager, ``auto`` is planned again with the eager sizes. Offloaded inputs keep the
layers compiled (:mod:`tuneloop.train.fast.offload`).

What was decided, and why, comes back as a :class:`FastPathReport`: the recipe shows it at start and writes
it into ``record.json`` (``train.fast_path``), so a run says which layers it checkpointed and whether its
layers were compiled. The head's loss (fused linear cross-entropy) needs no decision: it is always used
where the head is a plain linear layer (:mod:`tuneloop.train.loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tuneloop.config import RunConfig
from tuneloop.train.estimate import GIB, layers_compile
from tuneloop.train.fast.compile import CompileOptions, KernelOutcome, get_kernel_choice
from tuneloop.train.fast.memory import (
    CheckpointPlan,
    apply_checkpointing,
    budget_bytes,
    decoder_layers,
    plan_for,
)
from tuneloop.train.fast.offload import CompiledLayerCall


@dataclass(frozen=True)
class FastPathReport:
    """What the fast path did to a model (kept in ``record.json`` under ``train.fast_path``)."""

    kernels: str  # actually in use: "compile", "fused" or "eager"
    kernels_requested: str
    checkpointed_layers: int
    total_layers: int
    checkpointed_indices: tuple[int, ...]
    offload: bool
    predicted_peak_gib: float | None
    budget_gib: float | None
    reasons: tuple[str, ...]
    cuda_graphs: bool = False  # set by the SFT recipe (tuneloop.train.fast.graphs.plan_step_graphs)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "checkpointed_indices": list(self.checkpointed_indices), "reasons": list(self.reasons)}

    def summary(self) -> str:
        """One line for the console: kernels, checkpointed layers, offload, predicted peak."""
        text = f"kernels {self.kernels}; gradient checkpointing {self.checkpointed_layers}/{self.total_layers} layers"
        if self.offload:
            text += " (inputs offloaded to host memory)"
        if self.cuda_graphs:
            text += "; steps replayed as CUDA graphs"
        if self.predicted_peak_gib is not None:
            text += f"; predicted peak {self.predicted_peak_gib:.1f} GiB"
        if self.budget_gib is not None:
            text += f" of a {self.budget_gib:.1f} GiB budget"
        return text


def apply_fast_path(
    model: Any,
    config: RunConfig,
    *,
    device: torch.device,
    tokens_per_micro_batch: int,
    budget: float | None = None,
    compile_backend: str | Callable[..., Any] = "inductor",
    autocast_dtype: torch.dtype | None = None,
    keep_peft_layers: bool = False,
) -> FastPathReport:
    """Set per-layer checkpointing and compile the decoder layers of ``model`` (adapter-wrapped) in place.

    ``tokens_per_micro_batch``: tokens of the largest micro-batch (``batch_size x max_seq_len``, or the packed
    count), for the memory plan. ``budget``: bytes the run may use (default ``memory_budget_gib``, else the
    GPU memory free at start less 5%). ``compile_backend``: ``torch.compile``'s backend (tests pass a cheap
    one). ``autocast_dtype``: the training step's autocast dtype, so the compile probe traces what training runs.
    ``keep_peft_layers``: the recipe needs PEFT's own LoRA layers in the loop (DPO switches them off for its
    reference pass), so 4-bit layers are not compiled with fused LoRA linears.
    """
    device = torch.device(device)
    layers = decoder_layers(model)
    budget = budget if budget is not None else budget_bytes(config, device)
    expect_compiled = layers_compile(config) and (config.kernels == "compile" or device.type == "cuda")
    plan = plan_for(model, config, layers, device, tokens_per_micro_batch, budget, compiled=expect_compiled)
    options = CompileOptions(
        backend=compile_backend, autocast_dtype=autocast_dtype, max_seq_len=config.max_seq_len,
        packing=config.packing, cuda_graphs=config.cuda_graphs, fuse_lora=not keep_peft_layers,
    )  # fmt: skip
    outcome = apply_plan(model, config, layers, plan, device, options, expect_compiled=expect_compiled)
    if expect_compiled and outcome.kernels != "compile" and config.gradient_checkpointing == "auto":
        plan = plan_for(model, config, layers, device, tokens_per_micro_batch, budget, compiled=False)
        apply_checkpointing(layers, plan.checkpointed_layers, offload=plan.offload, pin_memory=device.type == "cuda")
        if plan.checkpointed_layers:
            _no_cache(model)
    chosen = tuple(range(plan.checkpointed_layers))
    return FastPathReport(
        kernels=outcome.kernels,
        kernels_requested=config.kernels,
        checkpointed_layers=len(chosen),
        total_layers=len(layers),
        checkpointed_indices=chosen,
        offload=plan.offload,
        predicted_peak_gib=round(plan.predicted_peak / GIB, 2) if plan.predicted_peak is not None else None,
        budget_gib=round(plan.budget / GIB, 2) if plan.budget is not None else None,
        reasons=(plan.reason, outcome.reason),
    )


def apply_plan(
    model: Any,
    config: RunConfig,
    layers: list[torch.nn.Module],
    plan: CheckpointPlan,
    device: torch.device,
    options: CompileOptions,
    *,
    expect_compiled: bool,
) -> KernelOutcome:
    """Set ``plan``'s checkpoint flags, then run the ``kernels`` choice; what the kernels choice did comes back.

    Offloaded layers get their compiled trampoline before the kernels choice, so its probe compiles and runs
    what training will; if the choice ends eager, they are set again to run eagerly.
    """
    pin_memory = device.type == "cuda"
    run = CompiledLayerCall(options.backend, dynamic=options.dynamic) if plan.offload and expect_compiled else None
    apply_checkpointing(layers, plan.checkpointed_layers, offload=plan.offload, pin_memory=pin_memory, run=run)
    if plan.checkpointed_layers:
        _no_cache(model)
    outcome = get_kernel_choice(config.kernels)(model, layers, device, options)
    if run is not None and outcome.kernels != "compile":
        apply_checkpointing(layers, plan.checkpointed_layers, offload=True, pin_memory=pin_memory)
    return outcome


def _no_cache(model: Any) -> None:
    """A checkpointed layer must not write a KV cache twice (once more on the recompute); training needs none."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is not None:
        config.use_cache = False
