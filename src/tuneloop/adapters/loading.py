"""Load a base model the way its adapter method needs it: plain weights, or quantized while loading.

QLoRA's 4-bit base is made by transformers' bitsandbytes integration as the safetensors are read, so the
full-precision weights never sit on the GPU. bitsandbytes is an optional, GPU-only dependency: it is
imported here and only for a quantized method, and its absence is a clear error, not an ImportError.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from tuneloop.adapters.registry import AdapterMethod, QuantizationSpec
from tuneloop.models import ModelSource, load_causal_lm


class QuantizationUnavailable(RuntimeError):
    """The method quantizes the base, and this machine cannot (no CUDA, or bitsandbytes missing)."""


def require_quantization_support(method: AdapterMethod, device: torch.device) -> QuantizationSpec:
    spec = method.quantization
    assert spec is not None
    if device.type != "cuda":
        raise QuantizationUnavailable(
            f"adapter {method.name} quantizes the base with bitsandbytes and needs a CUDA GPU; "
            "on this machine use adapter: lora"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailable(
            f"adapter {method.name} needs bitsandbytes: pip install 'tuneloop[gpu]' (or pip install bitsandbytes)"
        )
    return spec


def load_base_model(source: ModelSource, method: AdapterMethod, dtype: torch.dtype, device: torch.device) -> Any:
    """The base model on ``device``; quantized to ``method.quantization`` when the method asks for it."""
    if method.quantization is None:
        return load_causal_lm(source, dtype, device)
    spec = require_quantization_support(method, device)
    from transformers import AutoModelForCausalLM

    index = device.index if device.index is not None else torch.cuda.current_device()
    return AutoModelForCausalLM.from_pretrained(
        source.location,
        quantization_config=spec.to_transformers(),
        dtype=getattr(torch, spec.compute_dtype),
        device_map={"": index},
        trust_remote_code=False,
        use_safetensors=True,
    )
