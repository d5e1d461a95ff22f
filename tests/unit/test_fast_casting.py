"""Under autocast, skipping PEFT's fp32 upcast of LoRA inputs changes no number and removes copies.

A bf16 base with fp32 LoRA weights (PEFT's default) under CPU bf16 autocast: the loss and every LoRA gradient
are bit-identical with the upcast on and off, the step dispatches fewer casts, and PEFT's setting comes back
after the context (generation and serving run without autocast and need it).
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.unit.test_packing import encode
from tuneloop.train.batching import collate
from tuneloop.train.fast.casting import adapter_inputs_in_autocast_dtype
from tuneloop.train.loss import TrainedTokenLoss

pytestmark = pytest.mark.unit


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def bf16_lora(folder):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(base, config)


def step(model, batch):
    model.zero_grad()
    counter = CountOps()
    with counter, torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = TrainedTokenLoss(model)(**batch)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counter.ops["aten._to_copy"]


def test_same_loss_and_gradients_with_fewer_casts(tiny_model_dir, tiny_tokenizer):
    model = bf16_lora(tiny_model_dir)
    lora_weights = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora_weights and all(p.dtype == torch.float32 for p in lora_weights)  # PEFT's fp32 adapters
    batch = collate(encode(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    loss, grads, casts = step(model, batch)
    with adapter_inputs_in_autocast_dtype(model, autocast_dtype=torch.bfloat16, dora=False):
        fast_loss, fast_grads, fast_casts = step(model, batch)
    assert torch.equal(fast_loss, loss)
    for name, grad in grads.items():
        assert torch.equal(fast_grads[name], grad), name
    assert fast_casts < casts
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)  # restored after the loop


def test_nothing_changes_without_autocast_or_for_dora(tiny_model_dir):
    model = bf16_lora(tiny_model_dir)
    for context in (
        adapter_inputs_in_autocast_dtype(model, autocast_dtype=None, dora=False),
        adapter_inputs_in_autocast_dtype(model, autocast_dtype=torch.bfloat16, dora=True),
    ):
        with context:
            assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))
