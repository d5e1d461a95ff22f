"""The adapter registry: every method imports on a CPU-only install, QLoRA carries its quantization spec."""

from __future__ import annotations

import importlib.util

import pytest

from tuneloop.adapters import ADAPTER_METHODS, QuantizationSpec, get_adapter_method

pytestmark = pytest.mark.unit


def test_registry_lists_the_methods():
    assert {"lora", "dora", "qlora", "full"} <= set(ADAPTER_METHODS)
    with pytest.raises(KeyError, match="known: dora, full, lora, qlora"):
        get_adapter_method("lorax")


def test_qlora_is_nf4_with_double_quantisation_and_bf16_compute():
    spec = get_adapter_method("qlora").quantization
    assert spec == QuantizationSpec(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
    # 4 bits + 8-bit absmax per 64 weights + fp32 scale per 256 absmax: the QLoRA paper's 4.127 bits
    assert spec.bytes_per_param * 8 == pytest.approx(4.127, abs=1e-3)
    assert get_adapter_method("lora").quantization is None


def test_quantization_config_is_built_for_transformers():
    import torch

    config = get_adapter_method("qlora").quantization.to_transformers()
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes installed here")
def test_loading_qlora_without_bitsandbytes_says_what_to_install(tiny_model_dir):
    import torch

    from tuneloop.adapters.loading import QuantizationUnavailable, require_quantization_support

    with pytest.raises(QuantizationUnavailable, match="CUDA GPU"):
        require_quantization_support(get_adapter_method("qlora"), torch.device("cpu"))
    with pytest.raises(QuantizationUnavailable, match="pip install"):
        require_quantization_support(get_adapter_method("qlora"), torch.device("cuda"))


def test_dora_and_rslora_reach_the_peft_config(tiny_config):
    from tuneloop.adapters.registry import lora_config

    config = tiny_config(use_rslora=True)
    assert lora_config(config, use_dora=True).use_dora
    assert lora_config(config, use_dora=False).use_rslora
