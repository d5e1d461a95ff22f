"""Offloaded checkpointing (``fast/offload.py``): exact gradients, compiled layers, few graphs, compiled memory sizes.

On the CPU the input stays where it is (offload is a CUDA thing), so what is checked here is everything else:
the Function's recompute and gradients against no checkpointing and torch's checkpoint, and the compiled
trampoline under ``aot_eager``. The copies to and from host memory and the memory they save are checked in
``tests/gpu/test_gpu_offload.py``.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_fast_compile import counting_backend, failing_backend
from tuneloop.train.estimate import COMPILED_ACTIVATION_FACTOR, GIB, layers_compile, memory_model
from tuneloop.train.fast.apply import apply_plan
from tuneloop.train.fast.compile import CompileOptions
from tuneloop.train.fast.fused import fused_layers_for
from tuneloop.train.fast.memory import CheckpointPlan, apply_checkpointing, decoder_layers, plan_checkpointing
from tuneloop.train.fast.offload import CompiledLayerCall, OffloadedCheckpoint

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("fresh_dynamo")]

CPU = torch.device("cpu")



def build(tiny_model_dir, config, layers: int | None = None):
    """The tiny conftest Llama (fp32), or the same config with more layers (random weights, same seed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneloop.adapters import get_adapter_method

    torch.manual_seed(0)
    if layers is None:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    else:
        hf_config = AutoConfig.from_pretrained(tiny_model_dir)
        hf_config.num_hidden_layers = layers
        base = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    base.config.use_cache = False
    return get_adapter_method(config.adapter).apply(base, config)


def batches(tokenizer, sizes=(4,)):
    from tests.unit.test_loss import examples
    from tuneloop.train.batching import collate

    items = examples(tokenizer)
    return [collate(items[:n], tokenizer.pad_token_id) for n in sizes]


def step(model, batch, seed: int = 1):
    from tuneloop.train.loss import TrainedTokenLoss

    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks in every variant
    loss, _ = TrainedTokenLoss(model)(**batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(run, reference, rtol=1e-5, atol=1e-7):
    (loss, grads), (want_loss, want_grads) = run, reference
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert grads.keys() == want_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=rtol, atol=atol)


@pytest.mark.parametrize(("adapter", "dropout"), [("lora", 0.0), ("lora", 0.1), ("dora", 0.0), ("full", 0.0)])
def test_gradients_equal_no_checkpointing_and_torch_checkpoint(tiny_config, tiny_model_dir, tiny_tokenizer, adapter, dropout):
    config = tiny_config(adapter=adapter, lora_dropout=dropout)
    batch = batches(tiny_tokenizer)[0]
    plain = step(build(tiny_model_dir, config), batch)
    runs = {}
    for offload in (False, True):
        model = build(tiny_model_dir, config)
        layers = decoder_layers(model)
        apply_checkpointing(layers, len(layers), offload=offload, pin_memory=False)
        assert all(isinstance(layer._gradient_checkpointing_func, OffloadedCheckpoint) == offload for layer in layers)
        runs[offload] = step(model, batch)
    assert_same(runs[False], plain)
    assert_same(runs[True], plain)
    assert_same(runs[True], runs[False], rtol=0, atol=0)  # the same recompute as torch's checkpoint, bit for bit


def test_first_layer_adapters_train_although_its_input_needs_no_gradient(tiny_config, tiny_model_dir, tiny_tokenizer):
    config = tiny_config(lora_dropout=0.0)
    model = build(tiny_model_dir, config)
    layers = decoder_layers(model)
    apply_checkpointing(layers, len(layers), offload=True, pin_memory=False)
    _, grads = step(model, batches(tiny_tokenizer)[0])
    first = [name for name in grads if ".layers.0." in name and "lora_B" in name]  # A: zero while B is (PEFT init)
    assert first and all(grads[name].abs().sum() > 0 for name in first)


def test_offloaded_layers_run_compiled_with_a_bounded_number_of_graphs(tiny_config, tiny_model_dir, tiny_tokenizer):
    """Four layers, every one checkpointed and offloaded, compiled by ``kernels: compile`` (``aot_eager``):
    the same loss and gradients as eager; graphs per kind (forward without gradients, the recompute, the first
    layer's input needing none), not per layer, sequence length or batch size, all compiled by the probe."""
    config = tiny_config(lora_dropout=0.0, kernels="compile")
    sizes = (4, 2, 3, 4)
    data = batches(tiny_tokenizer, sizes)
    eager = build(tiny_model_dir, config, layers=4)
    reference = [step(eager, batch) for batch in data]

    graphs: list[int] = []
    model = build(tiny_model_dir, config, layers=4)
    layers = decoder_layers(model)
    plan = CheckpointPlan(4, 4, True, None, None, "test: every layer offloaded")
    outcome = apply_plan(model, config, layers, plan, CPU, CompileOptions(backend=counting_backend(graphs)), expect_compiled=True)
    assert outcome.kernels == "compile", outcome.reason
    assert all(layer._gradient_checkpointing_func.compiles_layer for layer in layers)
    after_probe = len(graphs)
    assert after_probe >= 1  # the probe compiled and ran the offloaded layer before training
    with fused_layers_for(model, outcome.kernels):  # the swap the SFT loop makes: what the probe traced
        runs = [step(model, batch) for batch in data]
    for run, want in zip(runs, reference, strict=True):
        assert_same(run, want, rtol=1e-4, atol=1e-6)
    assert len(graphs) == after_probe, "training recompiled what the probe had compiled"
    # per kind ({forward without gradients, recompute} x {input needing a gradient or not}; dynamo may analyse
    # one twice): 6 here; graphs per layer would be at least 4 layers x 2 modes = 8
    assert 2 <= after_probe < 8, graphs


def test_a_failed_compile_leaves_offloaded_layers_eager(tiny_config, tiny_model_dir, tiny_tokenizer):
    config = tiny_config(lora_dropout=0.0, kernels="compile")
    batch = batches(tiny_tokenizer)[0]
    reference = step(build(tiny_model_dir, config), batch)
    calls: list[int] = []
    model = build(tiny_model_dir, config)
    layers = decoder_layers(model)
    plan = CheckpointPlan(2, 2, True, None, None, "test")
    with pytest.warns(RuntimeWarning, match="training eagerly"):
        outcome = apply_plan(model, config, layers, plan, CPU, CompileOptions(backend=failing_backend(calls)), expect_compiled=True)
    assert outcome.kernels == "eager" and calls
    assert not any(layer._gradient_checkpointing_func.compiles_layer for layer in layers)
    probed = len(calls)
    assert_same(step(model, batch), reference)
    assert len(calls) == probed, "an offloaded layer was still compiled after the fallback"


def test_eager_trampoline_is_a_plain_call():
    run = CompiledLayerCall()
    assert not run.compiled and run(lambda x, y: x + y, 2, 3) == 5



def test_compiled_layers_save_less_so_auto_checkpoints_fewer(tiny_config, llama8b):
    config = tiny_config(adapter="lora", lora_dropout=0.0, batch_size=2, max_seq_len=2048, kernels="compile", precision="bf16")
    compiled, _ = memory_model(config, llama8b, compiled=True)
    eager, _ = memory_model(config, llama8b, compiled=False)
    assert compiled.layer_activations == pytest.approx(COMPILED_ACTIVATION_FACTOR * eager.layer_activations, rel=1e-6)
    assert compiled.at(0).peak < eager.at(0).peak
    assert compiled.at(32).peak == eager.at(32).peak  # a recomputed layer is counted at its eager size
    budget = 25 * GIB
    fewer, more = plan_checkpointing(compiled, budget), plan_checkpointing(eager, budget)
    assert 0 < fewer.checkpointed_layers < more.checkpointed_layers
    assert memory_model(config, llama8b)[0] == compiled  # kernels: compile counts compiled layers by default


def test_offloaded_inputs_count_as_host_memory(tiny_config, llama8b):
    config = tiny_config(adapter="lora", lora_dropout=0.0, batch_size=2, max_seq_len=2048, precision="bf16")
    memory, _ = memory_model(config, llama8b)
    on_gpu, offloaded = memory.at(32), memory.at(32, offload=True)
    assert offloaded.host == 32 * memory.layer_input and on_gpu.host == 0
    assert on_gpu.peak - offloaded.peak == 30 * memory.layer_input  # two stay: the recomputed one and the next
    budget = offloaded.peak + GIB  # the runtime overhead
    plan = plan_checkpointing(memory, budget)
    assert (plan.checkpointed_layers, plan.offload, plan.fits) == (32, True, True)


def test_which_kernels_compile_layers(tiny_config):
    assert layers_compile(tiny_config(kernels="compile")) and layers_compile(tiny_config(kernels="auto"))
    assert not layers_compile(tiny_config(kernels="eager"))
    assert layers_compile(tiny_config(adapter="qlora", kernels="compile"))  # 4-bit layers compile, LoRA linears fused
