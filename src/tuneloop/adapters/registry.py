"""The adapter-method registry: each method says how to wrap a loaded base model for training.

Import-light on purpose (the config validator reads :data:`ADAPTER_METHODS`); torch and PEFT are imported
only when a method is applied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuneloop.config.schema import RunConfig


@dataclass(frozen=True)
class AdapterMethod:
    """How one fine-tuning method prepares a model.

    ``master_weights_fp32``: the trained weights must stay in fp32 (full fine-tuning updates the base
    weights, and bf16 weights lose small updates); adapter methods keep a low-precision frozen base and
    fp32 adapters.
    ``saves_adapter``: the run's artefact is a PEFT adapter (else a full model folder).
    """

    name: str
    description: str
    apply: Callable[[Any, RunConfig], Any]
    master_weights_fp32: bool = False
    saves_adapter: bool = True


def _lora_config(config: RunConfig, *, use_dora: bool) -> Any:
    from peft import LoraConfig, TaskType

    targets = config.lora_target_modules
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets if targets == "all-linear" else list(targets),
        use_dora=use_dora,
        bias="none",
    )


def _apply_peft(use_dora: bool) -> Callable[[Any, RunConfig], Any]:
    def apply(model: Any, config: RunConfig) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, _lora_config(config, use_dora=use_dora))

    return apply


def _apply_full(model: Any, config: RunConfig) -> Any:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


ADAPTER_METHODS: dict[str, AdapterMethod] = {
    method.name: method
    for method in (
        AdapterMethod("lora", "Low-rank adapters on the chosen linear layers (PEFT).", _apply_peft(use_dora=False)),
        AdapterMethod("dora", "Weight-decomposed low-rank adapters (PEFT use_dora).", _apply_peft(use_dora=True)),
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
