"""The adapter-method registry: each method says how to load and wrap a base model for training.

Import-light on purpose (the config validator reads :data:`ADAPTER_METHODS`); torch, PEFT and bitsandbytes
are imported only when a method is applied, so a CPU-only install imports every method, QLoRA included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuneloop.config.schema import RunConfig


@dataclass(frozen=True)
class QuantizationSpec:
    """How the frozen base is quantized at load time (QLoRA: 4-bit NF4, double quantisation, bf16 compute).

    A typed field of the method rather than a name check in the recipe: the loader, the memory estimate and
    the run record all read it from here.
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    blocksize: int = 64

    @property
    def bytes_per_param(self) -> float:
        """Stored bytes per quantized weight: 4 bits plus the absmax scales of each block.

        One fp32 scale per 64 weights (0.5 bit); double quantisation stores those scales in 8 bits with one
        fp32 scale per 256 of them: 8/64 + 32/(64*256) = 0.127 bit.
        """
        scale_bits = (8 / self.blocksize + 32 / (self.blocksize * 256)) if self.double_quant else 32 / self.blocksize
        return (self.bits + scale_bits) / 8

    def as_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "compute_dtype": self.compute_dtype,
        }

    def to_transformers(self) -> Any:
        """The ``BitsAndBytesConfig`` for ``from_pretrained``; needs the optional ``bitsandbytes`` package."""
        import torch
        from transformers import BitsAndBytesConfig

        if self.bits != 4:
            raise ValueError(f"only 4-bit quantization is supported, got {self.bits}")
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
        )


@dataclass(frozen=True)
class AdapterMethod:
    """How one fine-tuning method prepares a model.

    ``master_weights_fp32``: the trained weights must stay in fp32 (full fine-tuning updates the base
    weights, and bf16 weights lose small updates); adapter methods keep a low-precision frozen base and
    fp32 adapters.
    ``saves_adapter``: the run's artefact is a PEFT adapter (else a full model folder). Only such methods
    can switch the adapter off, which is how DPO gets its reference model without a second copy.
    ``quantization``: the base is quantized while loading (needs a CUDA GPU and bitsandbytes).
    ``use_dora``: the adapters are weight-decomposed (DoRA); the memory estimate counts their magnitudes.
    """

    name: str
    description: str
    apply: Callable[[Any, RunConfig], Any]
    master_weights_fp32: bool = False
    saves_adapter: bool = True
    quantization: QuantizationSpec | None = None
    use_dora: bool = False


def lora_config(config: RunConfig, *, use_dora: bool) -> Any:
    from peft import LoraConfig, TaskType

    targets = config.lora_target_modules
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets if targets == "all-linear" else list(targets),
        use_dora=use_dora,
        use_rslora=config.use_rslora,
        bias="none",
    )


def _apply_peft(use_dora: bool) -> Callable[[Any, RunConfig], Any]:
    def apply(model: Any, config: RunConfig) -> Any:
        from peft import PeftModel, get_peft_model

        if config.init_adapter is not None:
            from tuneloop.models.trained import find_artifact

            folder = find_artifact(config.init_adapter)
            return PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        return get_peft_model(model, lora_config(config, use_dora=use_dora))

    return apply


def _apply_full(model: Any, config: RunConfig) -> Any:
    if config.init_adapter is not None:
        raise ValueError("init_adapter needs an adapter method (lora, dora, qlora), not full")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


ADAPTER_METHODS: dict[str, AdapterMethod] = {
    method.name: method
    for method in (
        AdapterMethod("lora", "Low-rank adapters on the chosen linear layers (PEFT).", _apply_peft(use_dora=False)),
        AdapterMethod(
            "dora", "Weight-decomposed low-rank adapters (PEFT use_dora).", _apply_peft(use_dora=True), use_dora=True
        ),
        AdapterMethod(
            "qlora",
            "LoRA on a 4-bit NF4 base with double quantisation and bf16 compute (bitsandbytes, CUDA only).",
            _apply_peft(use_dora=False),
            quantization=QuantizationSpec(),
        ),
        AdapterMethod(
            "full", "Every weight trained; saves a full model.", _apply_full, master_weights_fp32=True, saves_adapter=False
        ),
    )
}


def get_adapter_method(name: str) -> AdapterMethod:
    try:
        return ADAPTER_METHODS[name]
    except KeyError:
        raise KeyError(f"unknown adapter {name!r}; known: {', '.join(sorted(ADAPTER_METHODS))}") from None
