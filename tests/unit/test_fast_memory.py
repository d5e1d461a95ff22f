"""``gradient_checkpointing: auto``: the planner's choice for a budget, per-layer flags, same losses either way."""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.unit.test_fast_compile import step
from tuneloop.train.estimate import (
    GIB,
    GPUS,
    RUNTIME_OVERHEAD_BYTES,
    MemoryModel,
    estimate,
    memory_model,
)
from tuneloop.train.fast import apply_fast_path
from tuneloop.train.fast.memory import apply_checkpointing, decoder_layers, plan_checkpointing, plan_for

pytestmark = pytest.mark.unit


def toy_memory(layers: int = 4) -> MemoryModel:
    """Round numbers: 10 GiB static, 2 GiB per un-checkpointed layer, 0.25 GiB per kept layer input, 1 GiB logits."""
    return MemoryModel(
        static={"weights": 10 * GIB}, gradients=0, layers=layers, layer_activations=2 * GIB, layer_input=GIB // 4,
        logits=GIB, edges=0, transient={}, step_temporaries=0, full=True,
    )  # fmt: skip



def test_each_checkpointed_layer_trades_its_activations_for_its_input():
    memory = toy_memory()
    peaks = memory.peaks()
    # k = 0: all four layers' activations + logits; each first layer checkpointed keeps 0.25 GiB instead of 2
    assert peaks[0] == 10 * GIB + 4 * 2 * GIB + GIB
    assert [peaks[k] - peaks[k + 1] for k in range(3)] == [2 * GIB - GIB // 4] * 3
    # all four: the recomputed layer (2 GiB) never coexists with the logits (1 GiB)
    assert peaks[4] == 10 * GIB + 4 * (GIB // 4) + 2 * GIB
    # inputs on the host, but for two on the GPU: the one recomputed and the next one, copied back ahead
    offloaded = memory.at(4, offload=True)
    assert offloaded.peak == 10 * GIB + 2 * (GIB // 4) + 2 * GIB
    assert offloaded.host == 4 * (GIB // 4) and memory.at(4).host == 0


@pytest.mark.parametrize("wanted", range(5))
def test_planner_picks_the_fewest_layers_that_fit(wanted):
    memory = toy_memory()
    budget = memory.at(wanted).peak + RUNTIME_OVERHEAD_BYTES
    plan = plan_checkpointing(memory, budget)
    assert (plan.checkpointed_layers, plan.offload, plan.fits) == (wanted, False, True)
    assert plan.predicted_peak == memory.at(wanted).peak
    one_byte_less = plan_checkpointing(memory, budget - 1)
    assert one_byte_less.checkpointed_layers == min(wanted + 1, 4)
    assert one_byte_less.offload == (wanted == 4)


def test_planner_offloads_when_every_layer_is_not_enough_and_says_when_nothing_fits():
    memory = toy_memory()
    offloaded = memory.at(4, offload=True).peak + RUNTIME_OVERHEAD_BYTES
    plan = plan_checkpointing(memory, offloaded)
    assert (plan.checkpointed_layers, plan.offload, plan.fits) == (4, True, True)
    hopeless = plan_checkpointing(memory, offloaded - 1)
    assert hopeless.offload and not hopeless.fits and "NOT fit" in hopeless.reason


def test_partial_plans_for_the_8b_shape_lie_between_none_and_all(tiny_config, llama8b):
    config = tiny_config(adapter="lora", lora_dropout=0.0, batch_size=2, max_seq_len=2048)
    memory, _ = memory_model(config, llama8b)
    result = estimate(config, llama8b)
    assert result.without_checkpointing.peak == memory.at(0).peak
    assert result.with_checkpointing.peak == memory.at(32).peak
    peaks = memory.peaks()
    assert all(a > b for a, b in itertools.pairwise(peaks))
    middle = (peaks[0] + peaks[-1]) / 2 + RUNTIME_OVERHEAD_BYTES
    plan = plan_checkpointing(memory, middle)
    assert 0 < plan.checkpointed_layers < 32


def test_auto_is_not_read_as_true_by_the_estimate(tiny_config, llama8b):
    auto = estimate(tiny_config(gradient_checkpointing="auto", batch_size=2, max_seq_len=2048), llama8b)
    assert auto.auto_plan() is None  # no memory_budget_gib: chosen on the GPU at start
    budget = 40.0
    planned = estimate(tiny_config(gradient_checkpointing="auto", memory_budget_gib=budget, batch_size=2, max_seq_len=2048), llama8b)
    plan = planned.auto_plan()
    assert plan.budget == budget * GIB and 0 < plan.checkpointed_layers < 32
    assert planned.configured.checkpointed_layers == plan.checkpointed_layers
    assert planned.configured.peak + RUNTIME_OVERHEAD_BYTES <= budget * GIB


def test_dpo_plans_for_chosen_and_rejected_rows(tiny_config, llama8b):
    sft = estimate(tiny_config(batch_size=2, max_seq_len=1024), llama8b)
    dpo = estimate(tiny_config(method="dpo", batch_size=2, max_seq_len=1024), llama8b)
    assert dpo.without_checkpointing.components["activations"] == 2 * sft.without_checkpointing.components["activations"]


def peft_model(tiny_model_dir, config):
    from transformers import AutoModelForCausalLM

    from tuneloop.adapters import get_adapter_method

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_adapter_method(config.adapter).apply(base, config)


def test_flags_are_set_on_the_first_layers_only(tiny_config, tiny_model_dir):
    model = peft_model(tiny_model_dir, tiny_config())
    layers = decoder_layers(model)
    assert len(layers) == 2
    assert apply_checkpointing(layers, 1, offload=False, pin_memory=False) == (0,)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    assert all(callable(layer._gradient_checkpointing_func) for layer in layers)


@pytest.fixture
def batch(tiny_tokenizer):
    from tests.unit.test_loss import examples
    from tuneloop.train.batching import collate

    return collate(examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)


@pytest.mark.parametrize("checkpointed,offload", [(1, False), (2, False), (2, True)])
def test_checkpointed_layers_give_the_same_loss_and_gradients_and_recompute(tiny_config, tiny_model_dir, batch, checkpointed, offload):
    config = tiny_config(lora_dropout=0.0)
    reference_loss, reference_grads = step(peft_model(tiny_model_dir, config), batch)
    model = peft_model(tiny_model_dir, config)
    layers = decoder_layers(model)
    apply_checkpointing(layers, checkpointed, offload=offload, pin_memory=False)
    calls = [0] * len(layers)
    for index, layer in enumerate(layers):  # a pre-hook: the recompute stops early, before post-hooks run
        layer.mlp.register_forward_pre_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    loss, grads = step(model, batch)
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-5, atol=1e-7)
    # a checkpointed layer runs twice (forward, then recomputed in the backward pass); the others once
    assert calls == [2 if i < checkpointed else 1 for i in range(len(layers))]


def test_cpu_plans_follow_the_config(tiny_config, tiny_model_dir):
    cpu = torch.device("cpu")
    for choice, expected in (("auto", 0), (True, 2), (False, 0)):
        config = tiny_config(gradient_checkpointing=choice)
        model = peft_model(tiny_model_dir, config)
        plan = plan_for(model, config, decoder_layers(model), cpu, 1024, None)
        assert plan.checkpointed_layers == expected and plan.predicted_peak is None
    report = apply_fast_path(model, tiny_config(gradient_checkpointing=True), device=cpu, tokens_per_micro_batch=1024)
    assert (report.checkpointed_layers, report.total_layers, report.checkpointed_indices) == (2, 2, (0, 1))
    assert report.kernels == "fused" and not report.offload  # auto on the CPU
    assert report.as_dict()["checkpointed_indices"] == [0, 1]
    assert "2/2 layers" in report.summary()


def test_cli_reports_the_auto_layer_count(tmp_path, tiny_model_dir, tiny_dataset):
    from tuneloop.cli.main import app

    config = {"base_model": str(tiny_model_dir), "train_file": str(tiny_dataset["train"]),
              "gradient_checkpointing": "auto", "memory_budget_gib": 80.0}  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["estimate", str(path)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert text.count("0/2") == len(GPUS) + 1  # the "auto" column of every GPU, and the config's own line
    assert "gradient checkpointing auto with a 80 GiB budget: 0/2 layers checkpointed" in text


def test_a_run_announces_its_fast_path_and_records_it(tiny_config, tmp_path):
    import json

    from tuneloop import train

    heard = []

    class Listener:
        def on_fast_path(self, report):
            heard.append(report)

        def on_train_start(self, total_steps, done_steps): ...
        def on_step(self, step, metrics): ...
        def on_epoch_end(self, epoch, metrics): ...
        def on_train_end(self): ...

    config = tiny_config(output_dir=str(tmp_path / "run"), gradient_checkpointing=True, epochs=1, report_to="none")
    result = train.run(config, observer=Listener())
    record = json.loads((result.output_dir / "record.json").read_text())
    assert [r.checkpointed_layers for r in heard] == [2]
    assert record["train"]["fast_path"] == heard[0].as_dict() == result.fast_path
    assert record["train"]["fast_path"]["checkpointed_indices"] == [0, 1]
