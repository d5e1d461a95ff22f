"""How much GPU memory a run needs, before it starts: ``tuneloop estimate CONFIG``.

The model's parameters are counted exactly (the architecture is built on PyTorch's ``meta`` device from its
``config.json``: no weights are read). Memory is then the sum of

* **weights** by precision: bf16/fp16 2 bytes, fp32 4 (full fine-tuning keeps fp32 master weights), NF4
  ~0.52 bytes for QLoRA's quantized linear layers (embeddings, norms and the head stay in bf16);
* **adapters**, their **gradients** and **optimizer state** (fp32; AdamW 8 bytes per trained parameter,
  8-bit AdamW ~2);
* **activations** saved for the backward pass at ``batch_size x max_seq_len`` tokens (twice that for DPO's
  chosen + rejected rows), with and without gradient checkpointing (then only each layer's input is kept,
  and one layer is recomputed at a time), or with only the first k layers checkpointed
  (:class:`MemoryModel`, which ``gradient_checkpointing: auto`` plans with);
* the **logits** of trained tokens (chunked above :func:`~tuneloop.train.loss.chunk_tokens`) and
  transients: autocast's bf16 weight copies (full fine-tuning), the optimizer step's temporaries,
  dequantizing one 4-bit layer.

Activation bytes per token and layer are linear in the layer's widths. The coefficients below were
measured on an NVIDIA H200 (torch 2.11, transformers 5.17, PEFT 0.21, bitsandbytes 0.50, bf16 autocast) by
``bench/activation_probe.py``: the peak memory of a training step on small Llama-architecture models
(hidden 256-512) at two depths and two lengths, whose double difference leaves the bytes one more token
costs in one more layer; a least-squares fit over seven shapes gives the coefficients. They were then
checked against the measured peaks of full-size shapes (135M, 1B, 8B) in ``bench/memory.py``
(``docs/training.md``). They assume a Llama-like decoder (RMSNorm, gated MLP, SDPA attention); other
architectures are estimated as if they were one. CPU runs differ (another attention kernel).
Every token is assumed trained (``trained_fraction=1``) unless told otherwise: an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuneloop.adapters import get_adapter_method
from tuneloop.config import RunConfig
from tuneloop.train.loss import chunk_tokens
from tuneloop.train.optim import get_optimizer_spec

if TYPE_CHECKING:
    from tuneloop.train.fast.memory import CheckpointPlan

GIB = 1 << 30

# Usable memory as the driver reports it (MiB), per GPU a user can name.
GPUS: dict[str, int] = {
    "T4 16GB": 15_360,
    "RTX 4090 24GB": 24_564,
    "A100 40GB": 40_960,
    "A100 80GB": 81_920,
    "H100 80GB": 81_559,
    "H200 141GB": 143_771,
}
# CUDA context, cuBLAS workspaces and allocator slack that no tensor accounts for.
RUNTIME_OVERHEAD_BYTES = 1 * GIB

# Peak bytes per token per decoder layer, as coefficients of (hidden, q width, intermediate, LoRA rank, 1),
# fitted by bench/activation_probe.py on an H200 (bench/results/activation-probe-h200.json).
_PER_LAYER = {
    "lora": (29.191, 14.448, 8.844, 62.113, -1368.4),  # LoRA dropout > 0 keeps a dropped copy of each input
    "lora-no-dropout": (29.588, 8.022, 6.5, -58.105, 2983.8),
    "qlora": (12.531, 12.986, 11.474, -105.964, 4729.8),
    "dora": (40.912, 9.6, 15.833, -170.985, 7226.9),
    "full": (28.034, 7.883, 8.403, 0.0, 841.6),
}
# Decoder layers compiled by ``kernels: compile`` save fewer activations: Inductor's min-cut partitioner recomputes
# element-wise results (norms, RoPE, SwiGLU, LoRA scaling) in the backward pass instead of saving them, also those
# the backward's matmuls read (tuneloop.train.fast.compile.inductor_recomputing_elementwise). Measured on the H200
# by bench/kernel_profile.py (Llama-3.1-8B shape, LoRA r16 all-linear, no dropout, bf16, 2 x 2048 tokens, fused
# head, torch 2.11): compiled with no layer checkpointed peaked at 27.82 GiB; less the static terms, logits and
# edges of this model (16.49 GiB) that is 11.33 GiB for 32 layers, 0.354 GiB per layer, against 0.951 GiB from the
# eager coefficients: a factor of 0.372 (0.554 under Inductor's default partitioner: 33.36 GiB). One measured
# shape and method: the factor scales every eager coefficient set alike until bench/activation_probe.py fits
# compiled layers of their own. The recompute of one checkpointed layer is *not* counted smaller: compiled, every
# layer checkpointed peaked at 17.63 GiB, which the eager coefficients predict (17.66 GiB).
COMPILED_ACTIVATION_FACTOR = 0.372
# With gradient checkpointing each layer keeps only its input hidden state: bf16, or fp32 for full fine-tuning
# (fp32 master weights make the residual stream fp32). Exact: counted with saved-tensor hooks, any width.
_CHECKPOINTED_BYTES_PER_HIDDEN = {"full": 4, "adapter": 2}
_LOGIT_BYTES = 12  # peak per trained token and vocabulary entry of the chunked head + loss (probe: 12.0-12.08)


def _coefficient_key(method: Any, dropout: float) -> str:
    if not method.saves_adapter:
        return "full"
    if method.quantization is not None:
        return "qlora"
    if method.use_dora:
        return "dora"
    return "lora" if dropout > 0 else "lora-no-dropout"


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about an architecture, counted on the meta device."""

    hidden: int
    intermediate: int
    layers: int
    q_width: int
    kv_width: int
    vocab: int
    total_params: int
    decoder_linear_params: int
    largest_linear: int
    linears: tuple[tuple[str, int, int], ...] = field(repr=False)  # (name, in, out) of the decoder's linears

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> ModelShape:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        head = model.get_output_embeddings()
        linears = tuple(
            (name, module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        )
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(
            hidden=hf_config.hidden_size,
            intermediate=hf_config.intermediate_size,
            layers=hf_config.num_hidden_layers,
            q_width=heads * head_dim,
            kv_width=(getattr(hf_config, "num_key_value_heads", None) or heads) * head_dim,
            vocab=hf_config.vocab_size,
            total_params=sum(p.numel() for p in model.parameters()),
            decoder_linear_params=sum(i * o for _, i, o in linears),
            largest_linear=max((i * o for _, i, o in linears), default=0),
            linears=linears,
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component for one setting of gradient checkpointing; ``peak`` is what the GPU must hold.

    ``checkpointed_layers``: how many decoder layers (the first ones) keep only their input; ``offload``:
    those inputs are kept in host memory instead.
    """

    gradient_checkpointing: bool
    components: dict[str, int]
    peak: int
    checkpointed_layers: int = 0
    offload: bool = False

    host: int = 0  # bytes of pinned host memory: the offloaded layer inputs

    def fits(self, capacity_mib: int) -> bool:
        return fits_budget(self.peak, capacity_mib * (1 << 20))


def fits_budget(peak: int, budget_bytes: float) -> bool:
    """Whether a predicted peak plus the runtime overhead no tensor accounts for stays within ``budget_bytes``."""
    return peak + RUNTIME_OVERHEAD_BYTES <= budget_bytes


@dataclass(frozen=True)
class MemoryModel:
    """The terms of a run's peak memory, from which the peak for any number of checkpointed layers follows.

    Kept apart from :func:`estimate` so the fast path's planner (``gradient_checkpointing: auto``) and
    ``tuneloop estimate`` predict with one formula.
    """

    static: dict[str, int]  # weights, adapters, optimizer state: held all the time
    gradients: int
    layers: int
    layer_activations: int  # saved for the backward pass by one layer that is not checkpointed
    layer_input: int  # kept by one checkpointed layer (its input hidden state)
    logits: int
    edges: int
    transient: dict[str, int]
    step_temporaries: int
    full: bool
    recompute_activations: int | None = None  # one checkpointed layer's recompute (default: layer_activations)

    def at(self, checkpointed_layers: int, *, offload: bool = False) -> MemoryEstimate:
        """The peak with the first ``checkpointed_layers`` layers checkpointed (inputs on the host if ``offload``).

        Offloaded inputs count as host memory (``host``); the GPU still holds two of them at a time: the one
        being recomputed and the next, copied back ahead of its backward (:mod:`tuneloop.train.fast.offload`).
        Checkpointing the *first* layers is what makes a partial choice pay: the backward pass reaches them
        last, when the saved activations of every later layer are already freed, so the one layer being
        recomputed never coexists with them, nor with the head's logits (the head's backward ran first).
        """
        k = max(0, min(checkpointed_layers, self.layers))
        kept = self.layer_input * (min(k, 2) if offload else k)
        saved = self.layer_activations * (self.layers - k)
        one_layer = self.layer_activations if self.recompute_activations is None else self.recompute_activations
        recompute = one_layer if k else 0
        working = kept + max(saved + self.logits, recompute)
        activations = kept + saved + recompute
        forward_backward = working + self.edges + sum(self.transient.values()) + (0 if self.full else self.gradients)
        optimizer_step = self.gradients + self.step_temporaries
        components = {
            **self.static,
            "gradients": self.gradients,
            "activations": int(activations),
            "logits": int(self.logits),
            **self.transient,
            "optimizer_step_temporaries": self.step_temporaries,
        }
        peak = sum(self.static.values()) + max(forward_backward, optimizer_step)
        offloaded = offload and k > 0
        return MemoryEstimate(k > 0, components, int(peak), k, offloaded, self.layer_input * k if offloaded else 0)

    def peaks(self) -> list[int]:
        """Predicted peak for 0, 1, ..., ``layers`` checkpointed layers (non-increasing)."""
        return [self.at(k).peak for k in range(self.layers + 1)]


@dataclass(frozen=True)
class EstimateResult:
    config_summary: dict[str, Any]
    trainable_params: int
    total_params: int
    without_checkpointing: MemoryEstimate
    with_checkpointing: MemoryEstimate
    memory: MemoryModel | None = None

    @property
    def configured(self) -> MemoryEstimate:
        """The setting the config asks for; ``auto`` with a ``memory_budget_gib`` is planned for that budget."""
        choice = self.config_summary["gradient_checkpointing"]
        if choice == "auto":
            plan = self.auto_plan()
            if plan is None or self.memory is None:
                return self.without_checkpointing
            return self.memory.at(plan.checkpointed_layers, offload=plan.offload)
        return self.with_checkpointing if choice else self.without_checkpointing

    def auto_plan(self, budget_bytes: float | None = None) -> CheckpointPlan | None:
        """``gradient_checkpointing: auto``'s choice for ``budget_bytes`` (default: the config's budget, if any)."""
        from tuneloop.train.fast.memory import plan_checkpointing

        budget = budget_bytes
        if budget is None and self.config_summary.get("memory_budget_gib") is not None:
            budget = self.config_summary["memory_budget_gib"] * GIB
        if budget is None or self.memory is None:
            return None
        return plan_checkpointing(self.memory, budget)

    def fits(self) -> dict[str, dict[str, bool]]:
        return {
            gpu: {"without": self.without_checkpointing.fits(mib), "with": self.with_checkpointing.fits(mib)}
            for gpu, mib in GPUS.items()
        }


def micro_batch_tokens(config: RunConfig) -> int:
    """Tokens of the longest micro-batch: ``batch_size x max_seq_len``, twice that for DPO (chosen + rejected)."""
    return config.batch_size * config.max_seq_len * (2 if config.method == "dpo" else 1)


def targeted_linears(shape: ModelShape, targets: tuple[str, ...] | str) -> list[tuple[str, int, int]]:
    """The linear layers LoRA wraps: all but the head for ``all-linear``, else those whose name ends in a target."""
    if targets == "all-linear":
        return list(shape.linears)
    return [(n, i, o) for n, i, o in shape.linears if any(n == t or n.endswith("." + t) for t in targets)]


def estimate(
    config: RunConfig,
    shape: ModelShape,
    *,
    trained_fraction: float = 1.0,
    weight_bytes: float | None = None,
    tokens: int | None = None,
    compiled: bool | None = None,
) -> EstimateResult:
    """The memory ``config`` needs on one GPU, with and without gradient checkpointing.

    ``weight_bytes``: bytes per weight of the compute precision (default bf16 = 2; fp32 runs pass 4).
    ``tokens``: tokens of the largest micro-batch (default :func:`micro_batch_tokens`; a packed batch can
    pass its own count). ``compiled``: whether the decoder layers are compiled (default: as ``kernels``
    would on a GPU, :func:`layers_compile`).
    """
    memory, trainable = memory_model(
        config, shape, trained_fraction=trained_fraction, weight_bytes=weight_bytes, tokens=tokens, compiled=compiled
    )
    summary = {
        "base_model": config.base_model,
        "adapter": config.adapter,
        "optimizer": config.optimizer,
        "batch_size": config.batch_size,
        "max_seq_len": config.max_seq_len,
        "gradient_checkpointing": config.gradient_checkpointing,
        "memory_budget_gib": config.memory_budget_gib,
        "layers": shape.layers,
        "trained_fraction": trained_fraction,
    }
    return EstimateResult(
        summary, trainable, shape.total_params, memory.at(0), memory.at(shape.layers), memory
    )


def memory_model(
    config: RunConfig,
    shape: ModelShape,
    *,
    trained_fraction: float = 1.0,
    weight_bytes: float | None = None,
    tokens: int | None = None,
    compiled: bool | None = None,
) -> tuple[MemoryModel, int]:
    """The terms of the peak for ``config`` on ``shape`` at ``tokens`` per micro-batch, and the trained parameters.

    Decoder layers that run compiled (``compiled``, default :func:`layers_compile`) save
    :data:`COMPILED_ACTIVATION_FACTOR` of the eager activations; a recomputed checkpointed layer is counted
    at the eager size either way.
    """
    method = get_adapter_method(config.adapter)
    optimizer = get_optimizer_spec(config.optimizer)
    low = weight_bytes or (4.0 if config.precision == "fp32" else 2.0)
    full = not method.saves_adapter
    tokens = tokens if tokens is not None else micro_batch_tokens(config)

    if full:
        trainable = shape.total_params
        weights = shape.total_params * 4.0
    else:
        wrapped = targeted_linears(shape, config.lora_target_modules)
        trainable = sum(config.lora_r * (i + o) + (o if method.use_dora else 0) for _, i, o in wrapped)
        if method.quantization is not None:
            quantized = shape.decoder_linear_params
            weights = quantized * method.quantization.bytes_per_param + (shape.total_params - quantized) * 2.0
        else:
            weights = shape.total_params * low
    static = {
        "weights": int(weights),
        "adapters": 0 if full else trainable * 4,
        "optimizer_state": int(trainable * optimizer.state_bytes_per_param),
    }
    key = _coefficient_key(method, config.lora_dropout)
    widths = (shape.hidden, shape.q_width, shape.intermediate, 0 if full else config.lora_r, 1)
    coefficients = _PER_LAYER.get(key) or _PER_LAYER["lora"]
    per_token = max(0.0, sum(c * w for c, w in zip(coefficients, widths)))
    compiled = layers_compile(config) if compiled is None else compiled
    saved_per_token = per_token * COMPILED_ACTIVATION_FACTOR if compiled else per_token

    trained = int(tokens * trained_fraction)
    logits = _LOGIT_BYTES * shape.vocab * min(trained, chunk_tokens(shape.vocab)) + trained * shape.hidden * 2
    memory = MemoryModel(
        static=static,
        gradients=trainable * 4,
        layers=shape.layers,
        layer_activations=int(saved_per_token * tokens),
        layer_input=_CHECKPOINTED_BYTES_PER_HIDDEN["full" if full else "adapter"] * shape.hidden * tokens,
        logits=int(logits),
        edges=tokens * shape.hidden * 8,  # embedding output and final norm
        transient={
            "autocast_weight_copies": int(shape.decoder_linear_params * 2) if full and low == 2.0 else 0,
            "dequantized_layer": int(shape.largest_linear * 2) if method.quantization is not None else 0,
        },
        step_temporaries=4 * trainable if optimizer.name == "adamw" else 0,  # foreach AdamW's sqrt buffer
        full=full,
        recompute_activations=int(per_token * tokens),
    )
    return memory, trainable


def layers_compile(config: RunConfig) -> bool:
    """Whether ``kernels`` compiles the decoder layers on a GPU: ``compile``, or ``auto`` without ``cuda_graphs``.
    4-bit layers (QLoRA) compile too, with fused LoRA linears (:mod:`tuneloop.train.fast.compile`); where they
    cannot (DPO, a 4-bit linear without a plain adapter), the fast path plans again with eager sizes."""
    return config.kernels == "compile" or (config.kernels == "auto" and not config.cuda_graphs)


def run(config: RunConfig, *, trained_fraction: float = 1.0) -> EstimateResult:
    """Estimate for ``config``'s base model (its ``config.json`` is read; no weights are loaded)."""
    from transformers import AutoConfig

    from tuneloop.models import resolve_model

    source = resolve_model(config.base_model)
    hf_config = AutoConfig.from_pretrained(source.location, trust_remote_code=False)
    precision_bytes = 4.0 if config.precision == "fp32" else 2.0
    return estimate(config, ModelShape.from_hf_config(hf_config), trained_fraction=trained_fraction, weight_bytes=precision_bytes)
