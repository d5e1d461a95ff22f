"""``tuneloop estimate``: exact parameter counts, components that move the right way, the CLI table."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.train.estimate import GPUS, ModelShape, estimate, targeted_linears

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def shape(tiny_model_dir) -> ModelShape:
    from transformers import AutoConfig

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_model_dir))



@pytest.mark.parametrize("adapter", ["lora", "dora", "full"])
def test_trainable_parameters_match_the_real_model(tiny_config, tiny_model_dir, shape, adapter):
    from transformers import AutoModelForCausalLM

    from tuneloop.adapters import get_adapter_method

    config = tiny_config(adapter=adapter, lora_r=4)
    model = get_adapter_method(adapter).apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate(config, shape).trainable_params == real
    assert shape.total_params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())


def test_named_targets_select_only_those_layers(shape):
    names = {name.rsplit(".", 1)[-1] for name, _, _ in targeted_linears(shape, ("q_proj", "v_proj"))}
    assert names == {"q_proj", "v_proj"}
    assert all("lm_head" not in name for name, _, _ in targeted_linears(shape, "all-linear"))


def test_components_move_the_right_way(tiny_config, llama8b):
    base = dict(batch_size=1, max_seq_len=2048)
    lora = estimate(tiny_config(adapter="lora", **base), llama8b)
    qlora = estimate(tiny_config(adapter="qlora", **base), llama8b)
    full = estimate(tiny_config(adapter="full", **base), llama8b)
    eight_bit = estimate(tiny_config(adapter="qlora", optimizer="adamw_8bit", **base), llama8b)
    longer = estimate(tiny_config(adapter="qlora", batch_size=2, max_seq_len=2048), llama8b)
    w = lambda e: e.without_checkpointing.components["weights"]  # noqa: E731
    assert w(qlora) < 0.4 * w(lora) < w(full) / 2  # NF4 ~0.52 bytes vs bf16 2 vs fp32 4 per weight
    assert full.trainable_params == llama8b.total_params and full.without_checkpointing.components["optimizer_state"] == 8 * llama8b.total_params
    assert eight_bit.with_checkpointing.components["optimizer_state"] < qlora.with_checkpointing.components["optimizer_state"] / 3
    assert qlora.with_checkpointing.components["activations"] < qlora.without_checkpointing.components["activations"] / 5
    assert longer.with_checkpointing.peak > qlora.with_checkpointing.peak
    # the reference point: QLoRA of an 8B model at 2048 tokens with checkpointing is well under 12 GiB
    assert qlora.with_checkpointing.peak < 12 * 2**30
    assert qlora.fits()["T4 16GB"]["with"] and not full.fits()["H100 80GB"]["with"]


def test_every_named_gpu_is_listed():
    assert {"T4 16GB", "RTX 4090 24GB", "A100 40GB", "A100 80GB", "H100 80GB"} <= set(GPUS)


def test_cli_prints_components_and_fits(tmp_path, tiny_model_dir, tiny_dataset):
    from tuneloop.cli.main import app

    config = {"base_model": str(tiny_model_dir), "train_file": str(tiny_dataset["train"]), "adapter": "qlora"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["estimate", str(path), "--set", "batch_size=4"])
    assert result.exit_code == 0, result.output
    for text in ("weights", "optimizer state", "activations", "gradient checkpointing", "T4 16GB", "H100 80GB", "peak"):
        assert text in result.output
