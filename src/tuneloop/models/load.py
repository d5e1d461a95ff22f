"""Load tokenizers and causal LMs safely: safetensors only, no remote code, a pad token always set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tuneloop.models.source import ModelSource


@dataclass(frozen=True)
class DeviceSetup:
    """Where a model runs and in which dtype it computes."""

    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"{self.device.type}/{str(self.dtype).removeprefix('torch.')}"


def cpu_supports_bf16() -> bool:
    """bf16 on CPU pays only with native support (AVX512-BF16 / AMX); elsewhere it is emulated and slow."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_device(precision: str = "auto") -> DeviceSetup:
    """The best available device and the dtype ``precision`` resolves to on it."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if precision == "auto":
        bf16_ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
        precision = "bf16" if bf16_ok else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return DeviceSetup(device, dtype)


def load_tokenizer(source: ModelSource | str) -> Any:
    from transformers import AutoTokenizer

    location = source.location if isinstance(source, ModelSource) else source
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(source: ModelSource | str, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    location = source.location if isinstance(source, ModelSource) else source
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=dtype, trust_remote_code=False, use_safetensors=True
    )
    return model.to(device)
