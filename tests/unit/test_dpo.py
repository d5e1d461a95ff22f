"""DPO on the tiny model: the reference is the base with the adapter off, rewards and accuracy are logged,
and held-out reward accuracy rises above 0.8."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TEST, TICKETS, VALIDATION
from tuneloop import train
from tuneloop.data import ChatRenderer, DataError
from tuneloop.models import load_tokenizer
from tuneloop.train.dpo import DPOLoss, collate_pairs, encode_pairs, load_preference_pairs, reference_logps, sequence_logps

pytestmark = pytest.mark.unit


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_style_pairs(folder: Path) -> tuple[Path, Path]:
    """Chosen: the label alone. Rejected: the label followed by a refusal. Held-out pairs use unseen prompts."""

    def pairs(rows):
        return [{"prompt": text, "chosen": label, "rejected": f"{label} no no no"} for text, label in rows]

    return (
        write_pairs(folder / "pairs-train.jsonl", pairs(TICKETS)),
        write_pairs(folder / "pairs-val.jsonl", pairs(VALIDATION + TEST)),
    )


def dpo_config(tiny_config, tmp_path, **overrides):
    train_file, val_file = write_style_pairs(tmp_path)
    options = dict(
        method="dpo", train_file=str(train_file), validation_file=str(val_file), test_file=None,
        epochs=3, learning_rate=5e-3, dpo_beta=0.5, report_to="none",
    )  # fmt: skip
    return tiny_config(**{**options, **overrides})


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_raises_held_out_reward_accuracy(tiny_config, tmp_path):
    config = dpo_config(tiny_config, tmp_path)
    result = train.run(config)
    record = json.loads((config.output_dir / "record.json").read_text())
    before = record["dpo"]["validation_before_training"]
    # a fresh adapter is the identity: policy == reference, every reward 0 (up to kernel rounding on a GPU), loss log 2
    assert before["val_loss"] == pytest.approx(0.693147, abs=1e-4)
    assert abs(before["val_reward_margin"]) < 1e-4
    assert result.validation["val_reward_accuracy"] > 0.8
    assert result.validation["val_reward_margin"] > 0
    steps = [r for r in rows(config.output_dir) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "pairs"} <= set(steps[0])
    assert (config.output_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert record["kind"] == "dpo"
    # auto is fused on the CPU for SFT; DPO's reference pass switches PEFT's layers off, so it keeps them
    assert record["train"]["fast_path"]["kernels"] == "eager"
    assert "DPO keeps PEFT's LoRA layers" in record["train"]["fast_path"]["reasons"]


def test_reference_is_the_base_model_with_the_adapter_off(tiny_config, tiny_model_dir, tmp_path):
    """No second model: the reference log-probs come from the policy's own weights, adapter disabled."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneloop.adapters.registry import lora_config

    config = dpo_config(tiny_config, tmp_path)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs, _ = encode_pairs(ChatRenderer(tokenizer), load_preference_pairs(config.train_file), config)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = collate_pairs(pairs, torch.zeros(len(pairs), 2), list(range(len(pairs))), tokenizer.pad_token_id)
    expected = sequence_logps(base.eval(), batch["input_ids"], batch["attention_mask"], batch["labels"])
    policy = get_peft_model(base, lora_config(config, use_dora=False))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a trained adapter: the policy now differs from the base
    reference = reference_logps(policy, pairs, tokenizer.pad_token_id, 4, torch.device("cpu"))
    torch.testing.assert_close(reference[:, 0], expected[: len(pairs)].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference[:, 1], expected[len(pairs) :].detach(), rtol=1e-5, atol=1e-5)
    module = DPOLoss(policy, beta=0.1)
    owned = {id(p) for p in module.parameters()}
    assert owned == {id(p) for p in policy.parameters()}  # one set of weights


def test_sequence_logps_sum_only_the_answer_tokens(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, -100, -100, 8, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    logps = sequence_logps(model, ids, mask, labels)
    full = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    expected0 = full[0, 1, 7] + full[0, 2, 8] + full[0, 3, 9]
    expected1 = full[1, 2, 8]
    torch.testing.assert_close(logps, torch.stack([expected0, expected1]), rtol=1e-5, atol=1e-5)


def test_dpo_can_start_from_an_sft_adapter(tiny_config, tmp_path):
    sft = train.run(tiny_config(output_dir=str(tmp_path / "sft"), epochs=1, report_to="none"))
    config = dpo_config(tiny_config, tmp_path, output_dir=str(tmp_path / "dpo"), init_adapter=str(sft.output_dir), epochs=1)
    train.run(config)
    record = json.loads((config.output_dir / "record.json").read_text())
    # the SFT adapter is on from step 0, so the policy already differs from the base reference
    assert record["dpo"]["validation_before_training"]["val_loss"] != pytest.approx(0.693147, abs=1e-4)


def test_non_preference_rows_are_an_error_naming_file_and_line(tiny_config, tmp_path):
    bad = write_pairs(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"text": "x", "label": "y"}])
    config = dpo_config(tiny_config, tmp_path, train_file=str(bad))
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        train.run(config)


def test_dpo_with_full_fine_tuning_is_refused_at_validation(tiny_config, tmp_path):
    from tuneloop.config import ConfigError

    with pytest.raises(ConfigError, match="needs an adapter"):
        dpo_config(tiny_config, tmp_path, adapter="full")
