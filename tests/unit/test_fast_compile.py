"""``kernels: compile``: decoder layers compiled in place (a cheap backend here), same losses, few graphs, safe fallback.

The backend is passed in (``compile_backend=``), never set globally: ``aot_eager`` runs dynamo's tracing and
AOTAutograd's forward/backward split, the parts that break on unsupported code, without Inductor's C++
compile. A real Inductor run on the CPU is in ``tests/integration/test_fast_inductor.py``.
"""

from __future__ import annotations

import pytest
import torch

from tuneloop.train.fast import apply_fast_path
from tuneloop.train.fast.compile import KERNELS, get_kernel_choice
from tuneloop.train.fast.memory import decoder_layers

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("fresh_dynamo")]

CPU = torch.device("cpu")



def counting_backend(graphs: list[int]):
    """``aot_eager`` that records each graph it compiles (its node count), to count compilations."""
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(graph_module, example_inputs):
        graphs.append(len(graph_module.graph.nodes))
        return aot_eager(graph_module, example_inputs)

    return backend


def failing_backend(calls: list[int]):
    def backend(graph_module, example_inputs):
        calls.append(1)
        raise RuntimeError("backend cannot compile this graph")

    return backend


def build(tiny_model_dir, config):
    from transformers import AutoModelForCausalLM

    from tuneloop.adapters import get_adapter_method

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_adapter_method(config.adapter).apply(base, config)


def batches(tokenizer, sizes=(4, 2, 3)):
    from tests.unit.test_loss import examples
    from tuneloop.train.batching import collate

    items = examples(tokenizer)
    return [collate(items[:n], tokenizer.pad_token_id) for n in sizes]  # different lengths and batch sizes


def step(model, batch):
    from tuneloop.train.loss import TrainedTokenLoss

    model.train()
    model.zero_grad()
    loss, _ = TrainedTokenLoss(model)(**batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(run, reference):
    (loss, grads), (want_loss, want_grads) = run, reference
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("adapter,checkpointing", [("lora", False), ("lora", True), ("dora", False), ("full", True)])
def test_compiled_layers_give_the_eager_loss_and_gradients(tiny_config, tiny_model_dir, tiny_tokenizer, adapter, checkpointing):
    config = tiny_config(adapter=adapter, lora_dropout=0.0, kernels="compile", gradient_checkpointing=checkpointing)
    batch = batches(tiny_tokenizer, sizes=(4,))[0]
    eager = build(tiny_model_dir, config.model_copy(update={"kernels": "eager"}))
    apply_fast_path(eager, config.model_copy(update={"kernels": "eager"}), device=CPU, tokens_per_micro_batch=512)
    reference = step(eager, batch)

    graphs: list[int] = []
    model = build(tiny_model_dir, config)
    report = apply_fast_path(model, config, device=CPU, tokens_per_micro_batch=512, compile_backend=counting_backend(graphs))
    assert report.kernels == "compile" and report.kernels_requested == "compile"
    assert report.checkpointed_layers == (2 if checkpointing else 0)
    compiled_by_probe = len(graphs)
    assert compiled_by_probe >= 1  # the probe compiled (and ran) a layer before any layer was switched over
    assert_same(step(model, batch), reference)


def test_layers_share_compiled_code_and_lengths_do_not_recompile(tiny_config, tiny_model_dir, tiny_tokenizer):
    """Two layers of different kinds (the first checkpointed, its input needing no gradient; the second not
    checkpointed): graphs are per kind and mode, not per layer, length or batch size."""
    from tuneloop.train.fast.compile import CompileOptions, compile_layers
    from tuneloop.train.fast.fused import fused_layers_for
    from tuneloop.train.fast.memory import apply_checkpointing
    from tuneloop.train.loss import TrainedTokenLoss

    graphs: list[int] = []
    model = build(tiny_model_dir, tiny_config(lora_dropout=0.0))
    layers = decoder_layers(model)
    apply_checkpointing(layers, 1, offload=False, pin_memory=False)
    model.get_base_model().config.use_cache = False  # as apply_fast_path does when it checkpoints
    outcome = compile_layers(model, layers, CPU, CompileOptions(backend=counting_backend(graphs)))
    assert outcome.kernels == "compile" and outcome.compiled_layers == 2
    after_probe = len(graphs)
    first, *others = batches(tiny_tokenizer, sizes=(4, 2, 3, 4, 2))
    with fused_layers_for(model, outcome.kernels):  # the swap the SFT loop makes: what the probe traced
        step(model, first)
        assert len(graphs) == after_probe, "training recompiled what the probe had compiled"
        for batch in others:  # other lengths and batch sizes (all > 1)
            step(model, batch)
        assert len(graphs) == after_probe, "a new sequence length or batch size recompiled a layer"
        with torch.no_grad():
            model.eval()
            TrainedTokenLoss(model)(**first)
    # one graph per kind (dynamo may restart an analysis once, e.g. to turn Python floats into tensors,
    # which calls the backend twice for one graph)
    assert 2 <= after_probe <= 4, graphs
    assert len(graphs) <= after_probe + 4, graphs  # evaluation without gradients: one more graph per kind


def test_a_failing_compile_falls_back_to_eager_with_one_warning(tiny_config, tiny_model_dir, tiny_tokenizer):
    config = tiny_config(lora_dropout=0.0, kernels="compile")
    batch = batches(tiny_tokenizer, sizes=(4,))[0]
    reference = step(build(tiny_model_dir, config), batch)
    calls: list[int] = []
    model = build(tiny_model_dir, config)
    with pytest.warns(RuntimeWarning, match="training eagerly") as warned:
        report = apply_fast_path(model, config, device=CPU, tokens_per_micro_batch=512, compile_backend=failing_backend(calls))
    assert len([w for w in warned if issubclass(w.category, RuntimeWarning)]) == 1
    assert report.kernels == "eager" and "backend cannot compile" in report.reasons[-1]
    assert all(p.grad is None for p in model.parameters())  # the probe's backward left nothing behind
    probed = len(calls)
    assert_same(step(model, batch), reference)
    assert len(calls) == probed, "a layer was still compiled after the fallback"


def test_probe_leaves_no_trace_in_rng_modes_or_gradients(tiny_config, tiny_model_dir):
    config = tiny_config(kernels="compile", lora_dropout=0.1)
    model = build(tiny_model_dir, config)
    model.eval()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    apply_fast_path(model, config, device=CPU, tokens_per_micro_batch=512, compile_backend=counting_backend([]))
    torch.testing.assert_close(torch.rand(3), expected)  # dropout masks drawn by the probe did not move the RNG
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_auto_is_fused_on_cpu_and_the_registry_knows_every_config_value(tiny_config, tiny_model_dir):
    from typing import get_args

    from tuneloop.config.schema import RunConfig

    graphs: list[int] = []
    model = build(tiny_model_dir, tiny_config())
    report = apply_fast_path(model, tiny_config(kernels="auto"), device=CPU, tokens_per_micro_batch=512, compile_backend=counting_backend(graphs))
    assert report.kernels == "fused" and graphs == []
    assert set(KERNELS) == set(get_args(RunConfig.model_fields["kernels"].annotation))
    with pytest.raises(KeyError, match="unknown kernels"):
        get_kernel_choice("triton")


@pytest.mark.parametrize(("max_seq_len", "expected"), [(512, "eager"), (2048, "sdpa")])
def test_auto_on_cpu_uses_plain_attention_for_short_sequences(tiny_model_dir, tiny_config, tmp_path, max_seq_len, expected):
    config = tiny_config(output_dir=str(tmp_path / "run"), kernels="auto", max_seq_len=max_seq_len)
    model = build(tiny_model_dir, config)
    model.get_base_model().set_attn_implementation("sdpa")
    report = apply_fast_path(model, config, device=CPU, tokens_per_micro_batch=64)
    assert report.kernels == "fused"
    assert model.get_base_model().config._attn_implementation == expected
    assert ("plain matmul" in report.reasons[1]) == (expected == "eager")


def test_inductor_compiles_with_the_recompute_switch_lifted_for_that_compilation_only(monkeypatch):
    """``kernels: compile``'s Inductor runs with one partitioner heuristic off while it compiles (the memory
    estimate's compiled factor was measured so); other backends are handed over as given. The switch must
    exist in the installed torch: an upgrade that drops it fails here, not as a silent 5 GiB more at 8B."""
    from torch._functorch import config as functorch_config

    from tuneloop.train.fast import compile as fast_compile
    from tuneloop.train.fast.compile import (
        CompileOptions,
        elementwise_recompute_available,
        inductor_recomputing_elementwise,
    )

    assert elementwise_recompute_available()
    flag = fast_compile.ELEMENTWISE_RECOMPUTE_FLAG
    seen = []

    def fake_inductor(graph, example_inputs):
        seen.append(getattr(functorch_config, flag))
        return "compiled"

    monkeypatch.setattr(torch._dynamo, "lookup_backend", lambda name: fake_inductor if name == "inductor" else None)
    before = getattr(functorch_config, flag)
    assert inductor_recomputing_elementwise(None, []) == "compiled"
    assert seen == [False] and getattr(functorch_config, flag) == before
    assert CompileOptions(backend="inductor").compiler() is inductor_recomputing_elementwise
    assert CompileOptions(backend="inductor").compiler(checkpointed=True) == "inductor"
    assert CompileOptions(backend="aot_eager").compiler() == "aot_eager"
    assert CompileOptions(backend=fake_inductor).compiler() is fake_inductor
