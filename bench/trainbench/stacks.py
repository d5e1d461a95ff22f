"""The stacks under test, by name: each builds its model its own way and returns one training step.

Every stack trains LoRA r=16 on q/k/v/o/gate/up/down (alpha 16, dropout 0) of the same random model shape
with AdamW on the adapters, bf16, one optimizer step per batch, no gradient clipping (the same work for
all). What differs is what each stack is known for:

* ``hf+peft``: transformers + PEFT as a user of the plain stack runs them: SDPA attention, non-reentrant
  gradient checkpointing, the model's own loss (full logits); QLoRA through PEFT's
  ``prepare_model_for_kbit_training`` on a bitsandbytes NF4 base. Padded batches.
* ``hf+peft+liger``: the same with Liger's kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy),
  applied through Liger's own ``apply_liger_kernel_to_llama``. Padded batches.
* ``unsloth``: ``FastLanguageModel.from_pretrained`` / ``get_peft_model`` with Unsloth's gradient
  checkpointing (``"unsloth"``: every layer, inputs offloaded to the host), LoRA on a bf16 base or QLoRA on
  its NF4 load. Padded batches. Its other checkpointing modes are jobs of their own
  (:data:`UNSLOTH_CHECKPOINTING`): the issue's reference Unsloth row took 30.5 GiB on the H100, far above
  the 16.7 GiB the offloaded mode takes here, so the comparison is made against each mode.
* ``tuneloop``: tuneloop's own pieces: the adapter registry on an in-memory model (as
  ``train.setup.build_model`` does), the fast path (``tuneloop.train.fast.apply_fast_path``: compiled
  layers, activation checkpointing chosen for ``memory_budget_gib``), packed padding-free batches
  (``tuneloop.train.fast.packing.pack``) and ``TrainedTokenLoss``.

Each stack runs in its own process (Unsloth and Liger patch transformers when used), so importing this
module imports none of them; each builder imports what it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainbench.flops import LORA_TARGETS, DecoderShape
from trainbench.model import random_model
from trainbench.workloads import Batch, Workload, padded

LORA_RANK = 16
LORA_ALPHA = 16
LEARNING_RATE = 1e-4


@dataclass(frozen=True)
class StackContext:
    """What a stack's builder gets: the model shape, device, method, workload and memory budget."""

    shape: DecoderShape
    device: torch.device
    method: str  # lora | qlora
    workload: Workload
    budget_gib: float | None = None
    checkpoint_folder: Path | None = None
    checkpointing: str | None = None  # a mode of the stack's own other than its default (Stack.checkpointing)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def autocast(self) -> Any:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


@dataclass
class Trainer:
    """A built stack: ``inputs(batch)`` makes its device tensors, ``step(inputs)`` trains on them once."""

    inputs: Callable[[Batch], dict[str, Any]]
    step: Callable[[dict[str, Any]], torch.Tensor]
    layout: str
    info: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], Any] = lambda: None


@dataclass(frozen=True)
class Stack:
    name: str
    methods: tuple[str, ...]
    build: Callable[[StackContext], Trainer]
    peers: str | None = None  # folder under the peers dir put on PYTHONPATH for this stack's process only
    first_import: str | None = None  # imported before anything else in the process (Unsloth's patches)
    needs_checkpoint: bool = False  # loads from a folder (write_checkpoint) rather than an in-memory model
    checkpointing: tuple[str, ...] = ()  # activation-checkpointing modes a job may ask for besides the default


def _padded_inputs(device: torch.device) -> Callable[[Batch], dict[str, Any]]:
    def inputs(batch: Batch) -> dict[str, Any]:
        return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in padded(batch).items()}

    return inputs


def _adamw(model: Any, device: torch.device) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=LEARNING_RATE, fused=device.type == "cuda")


def _model_loss_step(ctx: StackContext, model: Any, optimizer: torch.optim.Optimizer) -> Callable[..., torch.Tensor]:
    """A step through the model's own forward with labels (its own loss: full, fused or chunked)."""

    def step(inputs: dict[str, Any]) -> torch.Tensor:
        with ctx.autocast():
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _qlora_spec() -> Any:
    from tuneloop.adapters import get_adapter_method

    return get_adapter_method("qlora").quantization


def _peft_lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none",
        task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, config)


def build_hf_peft(ctx: StackContext) -> Trainer:
    model = random_model(ctx.shape, ctx.device, ctx.dtype, _qlora_spec() if ctx.method == "qlora" else None)
    checkpointing = {"use_reentrant": False}
    if ctx.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=checkpointing
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model = _peft_lora(model)
    model.train()
    step = _model_loss_step(ctx, model, _adamw(model, ctx.device))
    return Trainer(_padded_inputs(ctx.device), step, "padded", {"gradient_checkpointing": "every layer"})


def build_hf_peft_liger(ctx: StackContext) -> Trainer:
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    # Liger's documented entry point: swaps the llama module's norm, RoPE, SwiGLU and loss for its kernels
    # (this process only); the model built after it uses them.
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    trainer = build_hf_peft(ctx)
    trainer.info["liger"] = "rope, rms_norm, swiglu, fused_linear_cross_entropy"
    return trainer


UNSLOTH_CHECKPOINTING: dict[str | None, str | bool] = {
    None: "unsloth",  # Unsloth's default: every layer, its inputs offloaded to host memory
    "every-layer": True,  # transformers' checkpointing of every layer, inputs kept on the GPU
    "no-checkpointing": False,
}


def build_unsloth(ctx: StackContext) -> Trainer:
    from unsloth import FastLanguageModel

    if ctx.checkpoint_folder is None:
        raise ValueError("unsloth loads a checkpoint folder; the orchestrator writes one first")
    qlora = ctx.method == "qlora"
    checkpointing = UNSLOTH_CHECKPOINTING[ctx.checkpointing]
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(ctx.checkpoint_folder), max_seq_length=max(2048, ctx.workload.longest()),
        dtype=torch.bfloat16, load_in_4bit=qlora, load_in_16bit=not qlora, fix_tokenizer=False,
        use_exact_model_name=True,
    )  # fmt: skip
    model = FastLanguageModel.get_peft_model(
        model, r=LORA_RANK, target_modules=list(LORA_TARGETS), lora_alpha=LORA_ALPHA, lora_dropout=0,
        bias="none", use_gradient_checkpointing=checkpointing, random_state=3407,
    )  # fmt: skip
    FastLanguageModel.for_training(model)
    step = _model_loss_step(ctx, model, _adamw(model, ctx.device))
    return Trainer(_padded_inputs(ctx.device), step, "padded", {"gradient_checkpointing": checkpointing})


def build_tuneloop(ctx: StackContext) -> Trainer:
    from tuneloop.adapters import get_adapter_method
    from tuneloop.config import validate_config
    from tuneloop.data.types import EncodedExample, RowRef
    from tuneloop.train.batching import to_device
    from tuneloop.train.fast import apply_fast_path
    from tuneloop.train.fast.attention import packed_attention
    from tuneloop.train.fast.casting import adapter_inputs_in_autocast_dtype
    from tuneloop.train.fast.fused import fused_layers_for
    from tuneloop.train.fast.packing import pack
    from tuneloop.train.loss import TrainedTokenLoss
    from tuneloop.train.optim import build_optimizer

    cuda = ctx.device.type == "cuda"
    config = validate_config({
        "base_model": "random", "train_file": "unused.csv", "adapter": ctx.method, "lora_r": LORA_RANK,
        "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "lora_target_modules": "all-linear",
        "learning_rate": LEARNING_RATE, "batch_size": ctx.workload.examples_per_batch, "precision": "bf16" if cuda else "fp32",
        "packing": True, "kernels": "compile" if cuda else "auto", "gradient_checkpointing": "auto",
        "memory_budget_gib": ctx.budget_gib,
    })  # fmt: skip
    # as train.setup.build_model does, on an in-memory base: weights (NF4 for qlora), then the method's wrapping
    method = get_adapter_method(config.adapter)
    base = random_model(ctx.shape, ctx.device, ctx.dtype, method.quantization)
    model = method.apply(base, config)
    report = apply_fast_path(
        model, config, device=ctx.device, tokens_per_micro_batch=ctx.workload.most_tokens_per_batch(),
        autocast_dtype=torch.bfloat16 if cuda else None,
    )  # fmt: skip
    # as train/sft.py: packed rows attend within each example (varlen flash attention on CUDA) while training,
    # LoRA inputs stay in the autocast dtype (PEFT's fp32 upcast is a round trip under autocast), and layers
    # the kernel choice left uncompiled as `fused` run fused (compiled layers: their LoRA linears)
    contexts = ExitStack()
    contexts.enter_context(fused_layers_for(model, report.kernels))
    contexts.enter_context(packed_attention(model))
    contexts.enter_context(
        adapter_inputs_in_autocast_dtype(model, autocast_dtype=torch.bfloat16 if cuda else None, dora=method.use_dora)
    )
    loss_module = TrainedTokenLoss(model, compiled=report.kernels == "compile").train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config.optimizer, trainable, lr=config.learning_rate, weight_decay=0.0, device=ctx.device)

    def inputs(batch: Batch) -> dict[str, Any]:
        examples = [EncodedExample(e.input_ids, e.labels, RowRef("bench", i)) for i, e in enumerate(batch)]
        return to_device(pack(examples), ctx.device)

    def step(batch_inputs: dict[str, Any]) -> torch.Tensor:
        with ctx.autocast():
            loss_sum, count = loss_module(**batch_inputs)
            loss = loss_sum / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    info = {"fast_path": report.as_dict()}  # kernels in use, checkpointed layers, predicted peak, budget
    return Trainer(inputs, step, "packed", info, close=contexts.close)


STACKS: dict[str, Stack] = {
    stack.name: stack
    for stack in (
        Stack("hf+peft", ("lora", "qlora"), build_hf_peft),
        Stack("hf+peft+liger", ("lora",), build_hf_peft_liger, peers="liger"),
        Stack(
            "unsloth", ("lora", "qlora"), build_unsloth, peers="unsloth", first_import="unsloth", needs_checkpoint=True,
            checkpointing=tuple(mode for mode in UNSLOTH_CHECKPOINTING if mode),
        ),
        Stack("tuneloop", ("lora", "qlora"), build_tuneloop),
    )
}


def get_stack(name: str) -> Stack:
    try:
        return STACKS[name]
    except KeyError:
        raise KeyError(f"unknown stack {name!r}; known: {', '.join(STACKS)}") from None
