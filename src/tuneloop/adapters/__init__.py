"""Fine-tuning methods, looked up by name (``adapter:`` in the config)."""

from tuneloop.adapters.registry import ADAPTER_METHODS, AdapterMethod, QuantizationSpec, get_adapter_method

__all__ = ["ADAPTER_METHODS", "AdapterMethod", "QuantizationSpec", "get_adapter_method"]
