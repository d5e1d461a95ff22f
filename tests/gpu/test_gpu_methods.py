"""QLoRA, 8-bit / paged optimizers, DoRA and DPO on the GPU, through the public training stage.

Tiny random model (tests/conftest.py); what is checked is that each method really is what it claims
(4-bit NF4 layers with double quantisation, bf16 compute, 8-bit optimizer state) and that a crash-resume
reproduces the uninterrupted curve with it.
"""

from __future__ import annotations

import json

import pytest
import torch

from tuneloop import train
from tuneloop.adapters import get_adapter_method
from tuneloop.adapters.loading import load_base_model
from tuneloop.models import resolve_model
from tuneloop.train.checkpoint import latest_checkpoint

from .conftest import needs_bitsandbytes

pytestmark = pytest.mark.gpu


def curve(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row.get("loss", row.get("val_loss")) for row in rows]


@needs_bitsandbytes
def test_qlora_loads_nf4_double_quant_with_bf16_compute(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_base_model(resolve_model(str(tiny_model_dir)), get_adapter_method("qlora"), torch.bfloat16, torch.device("cuda"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "no 4-bit layers"
    for layer in layers:
        assert layer.weight.quant_type == "nf4"
        assert layer.weight.compress_statistics  # double quantisation of the absmax scales
        assert layer.compute_dtype == torch.bfloat16
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)  # the head stays in bf16


@needs_bitsandbytes
@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw"])
def test_qlora_with_bitsandbytes_optimizers_trains_and_resumes_exactly(tiny_config, tmp_path, optimizer):
    options = dict(adapter="qlora", optimizer=optimizer, precision="bf16", save_every_steps=1, gradient_checkpointing=True, lora_dropout=0.0)
    reference = train.run(tiny_config(output_dir=str(tmp_path / "ref"), **options))
    losses = [v for v in curve(reference.output_dir) if v is not None]
    assert losses[-1] < losses[0]
    config = tiny_config(output_dir=str(tmp_path / "crash"), **options)

    class CrashAt4:
        def on_train_start(self, *a): pass
        def on_step(self, step, metrics):
            if step == 4:
                raise KeyboardInterrupt
        def on_epoch_end(self, *a): pass
        def on_train_end(self): pass

    with pytest.raises(KeyboardInterrupt):
        train.run(config, observer=CrashAt4())
    assert latest_checkpoint(config.output_dir / "checkpoints").name == "step-3"
    resumed = train.run(config, resume=True)
    assert curve(resumed.output_dir) == pytest.approx(curve(reference.output_dir), abs=1e-3)


@needs_bitsandbytes
def test_qlora_layers_compile_with_fused_4bit_lora_linears_and_train_as_eager(tiny_config, tmp_path):
    """``kernels: compile`` on QLoRA: the decoder layers compile (Inductor, CUDA) with their 4-bit LoRA linears as
    fused ones (the weight rebuilt by traced tensor ops), and the loss curve is eager QLoRA's within bf16 rounding."""
    options = {"adapter": "qlora", "precision": "bf16", "lora_dropout": 0.0, "gradient_checkpointing": False}
    eager = train.run(tiny_config(output_dir=str(tmp_path / "eager"), kernels="eager", **options))
    compiled = train.run(tiny_config(output_dir=str(tmp_path / "compiled"), kernels="compile", **options))
    record = json.loads((compiled.output_dir / "record.json").read_text())
    assert record["train"]["fast_path"]["kernels"] == "compile", record["train"]["fast_path"]["reasons"]
    assert record["fused_layers"]["lora_linears"] > 0 and record["fused_layers"]["rms_norms"] == 0
    want, got = curve(eager.output_dir), curve(compiled.output_dir)
    assert [v is None for v in got] == [v is None for v in want]
    assert [v for v in got if v is not None] == pytest.approx([v for v in want if v is not None], rel=2e-2)


def test_dora_and_full_train_on_gpu(tiny_config, tmp_path):
    for adapter in ("dora", "full"):
        result = train.run(tiny_config(output_dir=str(tmp_path / adapter), adapter=adapter, precision="bf16"))
        losses = [v for v in curve(result.output_dir) if v is not None]
        assert all(torch.isfinite(torch.tensor(losses)))
        assert result.steps == 6


@needs_bitsandbytes
def test_dpo_on_qlora_uses_no_second_model(tiny_config, tiny_model_dir, tmp_path):
    from tests.unit.test_dpo import write_style_pairs

    train_file, val_file = write_style_pairs(tmp_path)
    config = tiny_config(
        method="dpo", adapter="qlora", precision="bf16", train_file=str(train_file), validation_file=str(val_file),
        test_file=None, epochs=3, learning_rate=5e-3, dpo_beta=0.5,
    )  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    result = train.run(config)
    assert result.validation["val_reward_accuracy"] > 0.8
