"""QLoRA layers with fused LoRA linears over bitsandbytes 4-bit bases: same numbers as PEFT's, no dense weight
kept for the backward pass, and decoder layers that compile whole (what lets a QLoRA run take ``kernels: compile``).

bitsandbytes is an optional, GPU-side dependency; its 4-bit ops also run on the CPU, where these tests use them
(skipped where it is not installed). The tiny Llama's decoder linears are quantized in place to NF4 with double
quantisation, as a QLoRA load makes them; ``aot_eager`` runs dynamo and AOTAutograd, the parts that break on
untraceable code, without Inductor's C++ compile.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from tests.unit.test_fast_compile import batches, counting_backend
from tuneloop.config import validate_config
from tuneloop.train.fast import apply_fast_path
from tuneloop.train.fast.compile import CompileOptions, compile_layers
from tuneloop.train.fast.fused import fused_layers, fused_layers_for, unfused_four_bit_layers
from tuneloop.train.fast.memory import decoder_layers
from tuneloop.train.loss import TrainedTokenLoss

bnb = pytest.importorskip("bitsandbytes")

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("fresh_dynamo")]

CPU = torch.device("cpu")


def four_bit(linear: nn.Linear, nested: bool = True, quant_type: str = "nf4") -> nn.Module:
    """``linear`` as a ``Linear4bit`` with bf16 compute; by default NF4 with double quantisation (``nested``),
    a QLoRA load's settings."""
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=torch.bfloat16,
        compress_statistics=nested, quant_type=quant_type,
    )  # fmt: skip
    weight = linear.weight.detach().to(torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=nested, quant_type=quant_type
    )._quantize("cpu")
    return layer


def qlora_model(folder, quantization=None, **lora):
    """The tiny Llama, widened so that every weight row is a whole number of 64-value blocks, with 4-bit decoder
    linears and a LoRA adapter on them (random, non-zero B). Why widened: bitsandbytes' CPU dequantization
    (0.50) takes each row's blocks from the row's start, its quantization and CUDA kernels from the flat weight;
    they agree only when rows are whole blocks, as in real models (hidden sizes are multiples of 64)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    config.hidden_size, config.intermediate_size = 64, 128
    # 2 heads of 32 (not 4 of 16: the probe's 16-token rows would make dynamo take sequence length for head width)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for layer in base.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, four_bit(child, **(quantization or {})))
    settings = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **lora}
    return get_peft_model(base, LoraConfig(**settings))


def step(model, batch, *, autocast: bool = True):
    model.train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, count = TrainedTokenLoss(model)(**batch)
    (loss / count).backward()
    return (loss / count).detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def dense_reference(model):
    """The same model with each 4-bit base replaced by an fp32 ``nn.Linear`` holding its dequantized weight."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, bnb.nn.Linear4bit):
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
            weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
            dense.weight = nn.Parameter(weight.float(), requires_grad=False)
            module.base_layer = dense
    return reference


@contextmanager
def saved_tensors() -> Iterator[list[torch.Tensor]]:
    """Every tensor autograd saves for the backward pass inside the block."""
    saved: list[torch.Tensor] = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        yield saved


def dense_weights(saved, model) -> list[tuple[int, ...]]:
    """The shapes of saved tensors that hold one of the model's 4-bit weights dequantized (as is or transposed,
    in any floating dtype): found by value, so no activation of a matching shape is mistaken for one."""
    weights = [
        bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    ]
    found = []
    for tensor in saved:
        if not tensor.dtype.is_floating_point or tensor.dim() != 2:
            continue
        for weight in weights:
            for candidate in (weight, weight.t()):
                if tensor.shape == candidate.shape and torch.allclose(tensor.float(), candidate, rtol=1e-2):
                    found.append(tuple(tensor.shape))
    return found


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def all_grads(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[name].float().flatten() for name in sorted(grads)])


@pytest.mark.parametrize(
    "quantization", [{}, {"nested": False}, {"quant_type": "fp4"}], ids=["nf4-double-quant", "nf4", "fp4"]
)
def test_fused_4bit_lora_computes_the_dequantized_model_and_keeps_no_dense_weight(
    tiny_model_dir, tiny_tokenizer, quantization
):
    model = qlora_model(tiny_model_dir, quantization)
    batch = batches(tiny_tokenizer, sizes=(3,))[0]
    want_loss, want_grads = step(dense_reference(model), batch, autocast=False)
    peft_loss, peft_grads = step(model, batch)
    with fused_layers(model, enabled=True, lora_only=True) as counts:
        exact_loss, exact_grads = step(model, batch, autocast=False)
        with saved_tensors() as saved:
            fused_loss, fused_grads = step(model, batch)
    assert counts == {"lora_linears": 7 * model.config.num_hidden_layers, "rms_norms": 0}
    assert fused_grads.keys() == peft_grads.keys() == want_grads.keys() and fused_grads
    # fp32: exactly the model whose weights are the dequantized ones (the rebuilt weight is bitsandbytes' own)
    assert float(exact_loss) == pytest.approx(float(want_loss), rel=1e-5)
    assert relative_error(all_grads(exact_grads), all_grads(want_grads)) < 1e-4
    # bf16: as close to that fp32 computation as PEFT's own path over bitsandbytes (both bf16 matmuls)
    assert abs(fused_loss - want_loss) <= 2 * abs(peft_loss - want_loss) + 1e-3
    fused_error = relative_error(all_grads(fused_grads), all_grads(want_grads))
    peft_error = relative_error(all_grads(peft_grads), all_grads(want_grads))
    # (a bound on gross precision loss: which of two bf16 paths rounds closer varies with the weights; on this
    # tiny random model it ranged 0.55x-1.64x of PEFT's error over the three quantizations)
    assert fused_error <= 2 * peft_error + 1e-3, (fused_error, peft_error)
    # the backward pass rebuilds each weight from its 4-bit bytes: no dense [out, in] copy is saved for it
    assert not dense_weights(saved, model)
    assert any(t.dtype == torch.uint8 for t in saved)  # what is saved is the packed weight


def test_qlora_decoder_layers_compile_whole_and_train_as_eager(tiny_model_dir, tiny_tokenizer):
    config = validate_config(
        {"base_model": "x", "train_file": "t.csv", "kernels": "compile", "adapter": "qlora"}
    )
    eager_model = qlora_model(tiny_model_dir)
    model = copy.deepcopy(eager_model)
    graphs: list[int] = []
    report = apply_fast_path(
        model, config, device=CPU, tokens_per_micro_batch=64, compile_backend=counting_backend(graphs),
        autocast_dtype=torch.bfloat16,
    )  # fmt: skip
    assert report.kernels == "compile", report.reasons
    probe_graphs = len(graphs)
    for batch in batches(tiny_tokenizer):
        with fused_layers(eager_model, enabled=True, lora_only=True):
            eager_loss, eager_grads = step(eager_model, batch)
        with fused_layers_for(model, report.kernels) as counts, saved_tensors() as saved:
            loss, grads = step(model, batch)
        assert counts["lora_linears"] == 7 * model.config.num_hidden_layers
        # compiled, no dense weight is kept between the passes either: the backward pass rebuilds it from the
        # packed bytes (AOTAutograd merges the two rebuilds; the partitioner then recomputes, not saves, it)
        assert not dense_weights(saved, model)
        # the compiled layers compute what the same fused layers compute eagerly (bitsandbytes' dequantization
        # there, the traced one here), which the test above holds to the dequantized model
        assert float(loss) == pytest.approx(float(eager_loss), rel=1e-5)
        assert grads.keys() == eager_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6)
    # the probe traced what training ran (the same swap): training compiled nothing new
    assert len(graphs) == probe_graphs and probe_graphs > 0


def test_4bit_layers_stay_eager_when_a_4bit_linear_has_no_plain_adapter_or_peft_layers_are_kept(
    tiny_model_dir,
):
    options = CompileOptions(backend="aot_eager", probe=False)
    partial = qlora_model(tiny_model_dir, target_modules=["q_proj", "v_proj"])
    layers = decoder_layers(partial)
    assert sum(unfused_four_bit_layers(layer) for layer in layers) == 5 * len(layers)  # k, o, gate, up, down
    outcome = compile_layers(partial, layers, CPU, options)
    assert outcome.kernels == "eager" and "without a plain LoRA adapter" in outcome.reason

    full = qlora_model(tiny_model_dir)
    layers = decoder_layers(full)
    assert sum(unfused_four_bit_layers(layer) for layer in layers) == 0
    kept = compile_layers(
        full, layers, CPU, CompileOptions(backend="aot_eager", probe=False, fuse_lora=False)
    )
    assert kept.kernels == "eager" and "keeps PEFT's layers" in kept.reason
