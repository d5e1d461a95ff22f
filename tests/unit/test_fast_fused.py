"""Fused LoRA linears and RMSNorms compute what PEFT and transformers compute, with fewer ops, and leave no trace.

fp32: the loss and every LoRA gradient of a tiny Llama match PEFT's own forward to float rounding; under CPU bf16
autocast they are no further from an fp32 reference than PEFT's, and the step dispatches fewer elementwise ops. Layers that
are not plain LoRA (dropout, DoRA) and norms the fused op does not reproduce stay as they are; the parameter
names and objects seen inside the context are the model's, and the modules come back afterwards.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.unit.test_fast_casting import CountOps
from tests.unit.test_packing import encode
from tuneloop.train.batching import collate
from tuneloop.train.fast.fused import FusedLoraLinear, FusedRMSNorm, fused_layers, rms_norm_replacement
from tuneloop.train.loss import TrainedTokenLoss

pytestmark = pytest.mark.unit


def lora_model(folder, dtype=torch.float32, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **lora}
    return get_peft_model(base, LoraConfig(**settings))


def step(model, batch, autocast: bool = False):
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    model.zero_grad()
    counter = CountOps()
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss, _ = TrainedTokenLoss(model)(**batch)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counter.ops


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def test_fp32_loss_and_gradients_match_peft(tiny_model_dir, tiny_tokenizer):
    model = lora_model(tiny_model_dir)
    batch = collate(encode(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    loss, grads, _ = step(model, batch)
    with fused_layers(model, enabled=True) as counts:
        fused_loss, fused_grads, _ = step(model, batch)
    layers = model.config.num_hidden_layers
    assert counts == {"lora_linears": 7 * layers, "rms_norms": 2 * layers + 1}
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == grads.keys() and len(grads) == 2 * 7 * layers
    for name, grad in grads.items():  # float rounding: the sums run in another order
        assert relative_error(fused_grads[name], grad) < 1e-5, name


def test_bf16_autocast_as_accurate_with_fewer_elementwise_ops(tiny_model_dir, tiny_tokenizer):
    model = lora_model(tiny_model_dir, dtype=torch.bfloat16)
    batch = collate(encode(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    _, reference, _ = step(copy.deepcopy(model).float(), batch)  # the same weights, computed in fp32
    loss, grads, ops = step(model, batch, autocast=True)
    with fused_layers(model, enabled=True):
        fused_loss, fused_grads, fused_ops = step(model, batch, autocast=True)
    assert abs(fused_loss.item() - loss.item()) <= 1e-2 * abs(loss.item())
    peft_error = sum(relative_error(grads[n], g) for n, g in reference.items()) / len(reference)
    fused_error = sum(relative_error(fused_grads[n], g) for n, g in reference.items()) / len(reference)
    assert fused_error <= 1.1 * peft_error  # bf16 rounding either way; not worse than PEFT's own path
    # the adapter's scaling, its add and the weight casts go; the norms stay composite on the CPU
    elementwise = ("aten.mul", "aten.add", "aten.add_", "aten._to_copy")
    assert sum(fused_ops[op] for op in elementwise) < 0.7 * sum(ops[op] for op in elementwise)


def test_same_parameters_inside_and_modules_back_after(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    names = {n: p for n, p in model.named_parameters()}
    before = {n: type(m) for n, m in model.named_modules()}
    with fused_layers(model, enabled=True):
        inside = dict(model.named_parameters())
        assert inside.keys() == names.keys() and all(inside[n] is p for n, p in names.items())
        assert any(isinstance(m, FusedLoraLinear) for m in model.modules())
    assert {n: type(m) for n, m in model.named_modules()} == before
    with fused_layers(model, enabled=False) as counts:
        assert counts == {"lora_linears": 0, "rms_norms": 0}


@pytest.mark.parametrize("lora", [{"lora_dropout": 0.1}, {"use_dora": True}])
def test_layers_that_are_not_plain_lora_keep_peft(tiny_model_dir, lora):
    model = lora_model(tiny_model_dir, **lora)
    with fused_layers(model, enabled=True) as counts:
        assert counts["lora_linears"] == 0 and counts["rms_norms"] > 0
        assert not any(isinstance(m, FusedLoraLinear) for m in model.modules())


class OffsetRMSNorm(nn.Module):
    """Gemma's form, ``(1 + weight) * norm(x)``: same attributes as Llama's, different function."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1.0 + self.weight) * normed


def test_norm_replaced_only_where_the_probe_agrees(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    llama_norm = model.base_model.model.model.norm
    replacement = rms_norm_replacement(llama_norm)
    assert isinstance(replacement, FusedRMSNorm) and replacement.weight is llama_norm.weight
    assert rms_norm_replacement(OffsetRMSNorm(16)) is None
    assert rms_norm_replacement(nn.LayerNorm(16)) is None


def test_an_sft_run_records_its_fused_layers_and_saves_a_plain_peft_adapter(tiny_config):
    import json

    from safetensors.torch import load_file

    from tuneloop import train

    counts, tensors = {}, {}
    for kernels in ("fused", "eager"):
        config = tiny_config(kernels=kernels, lora_dropout=0.0, output_dir=str(tiny_config().output_dir) + kernels)
        result = train.run(config, overwrite=True)
        record = json.loads((result.output_dir / "record.json").read_text())
        assert record["train"]["fast_path"]["kernels"] == kernels
        counts[kernels] = record["fused_layers"]
        tensors[kernels] = load_file(next((result.output_dir / "adapter").glob("*.safetensors")))
    assert counts["fused"]["lora_linears"] > 0 and counts["fused"]["rms_norms"] > 0
    assert counts["eager"] == {"lora_linears": 0, "rms_norms": 0}
    assert tensors["fused"].keys() == tensors["eager"].keys()  # the saved adapter is PEFT's, names unchanged
    for name, value in tensors["eager"].items():
        assert relative_error(tensors["fused"][name].float(), value.float()) < 1e-3, name
