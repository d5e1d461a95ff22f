"""Base models: resolve a name to safetensors weights (converting GGUF once), load them safely."""

from tuneloop.models.load import DeviceSetup, load_causal_lm, load_tokenizer, pick_device
from tuneloop.models.source import ModelSource, ModelSourceError, resolve_model

__all__ = [
    "DeviceSetup",
    "ModelSource",
    "ModelSourceError",
    "load_causal_lm",
    "load_tokenizer",
    "pick_device",
    "resolve_model",
]
