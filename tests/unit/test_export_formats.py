"""Export formats on a tiny trained run: what each writes, the round trip, and that mismatches fail loudly."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TEST, TICKETS, VALIDATION, write_csv
from tuneloop import train
from tuneloop.config import validate_config
from tuneloop.export import EXPORT_FORMATS, ExportError, ExportOptions, get_format, run
from tuneloop.export.context import ExportContext
from tuneloop.export.deploy import PROBES, TEMPLATE_FAMILIES, match_family, modelfile, vllm_command
from tuneloop.export.roundtrip import check_greedy

pytestmark = pytest.mark.unit


def tiny_run(root, model_dir, **overrides):
    data = {
        n: write_csv(root / f"{n}.csv", rows)
        for n, rows in (("train", TICKETS), ("validation", VALIDATION), ("test", TEST))
    }
    config = validate_config(
        {
            "base_model": str(model_dir),
            "task": "classification",
            "train_file": str(data["train"]),
            "validation_file": str(data["validation"]),
            "test_file": str(data["test"]),
            "output_dir": str(root / "run"),
            "epochs": 4,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "precision": "fp32",
            "max_new_tokens": 4,
            "lora_r": 8,
            "lora_alpha": 16,
            "seed": 1,
            **overrides,
        }
    )
    train.run(config)
    return root / "run"


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("export-run"), tiny_model_dir)


def test_formats_are_a_registry():
    assert set(EXPORT_FORMATS) == {"adapter", "merged", "gguf"}
    assert EXPORT_FORMATS["gguf"].quants == ("f16", "q8_0", "q4_k_m")
    with pytest.raises(KeyError, match="unknown export format 'onnx'"):
        get_format("onnx")


def test_adapter_export_is_peft_loadable_with_a_card(run_dir, tmp_path):
    result = run(ExportOptions(run_dir=run_dir, format="adapter", out=tmp_path / "x"))
    folder = tmp_path / "x" / "adapter"
    assert (folder / "adapter_model.safetensors").read_bytes() == (
        run_dir / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and "billing, bug_report, onboarding" in card
    assert json.loads((run_dir / "record.json").read_text())["inputs"]["train"]["sha256"] in card
    [check] = result.output.roundtrips
    assert (check.loader, check.n, check.identical) == ("peft", len(TEST), len(TEST))
    assert "--enable-lora --lora-modules run=" in result.output.vllm_command
    assert (
        "--max-lora-rank 8" in result.output.vllm_command
        and "--max-model-len 256" in result.output.vllm_command
    )
    record = json.loads((tmp_path / "x" / "record.json").read_text())
    assert record["kind"] == "export" and record["exports"]["adapter"]["roundtrips"][0]["passed"]
    assert record["parent"]["path"].endswith("record.json")
    assert "vllm serve" in (tmp_path / "x" / "vllm-command.txt").read_text()


def test_merged_export_matches_the_adapter_model(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    result = run(ExportOptions(run_dir=run_dir, format="merged", out=tmp_path, dtype="fp16", evaluate=True))
    folder = tmp_path / "merged"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float16
    assert not any("lora" in name for name, _ in model.named_parameters())
    [check] = result.output.roundtrips
    assert check.identical == check.n == len(TEST)
    assert result.output.details["max_logit_diff"] < 0.05  # fp16 rounding of merged weights, nothing more
    evaluation = result.output.evaluation
    assert evaluation["n"] == len(TEST) and evaluation["same_answer"] == len(TEST)
    assert evaluation["delta"]["accuracy"] == 0.0
    assert json.loads((folder / "tuneloop.json").read_text())["merged_from"] == "lora"


def test_full_fine_tune_has_no_adapter_to_export(tiny_model_dir, tmp_path):
    run_dir = tiny_run(tmp_path, tiny_model_dir, adapter="full", epochs=1, learning_rate=1e-4)
    with pytest.raises(ExportError, match="saves a whole model; export merged"):
        run(ExportOptions(run_dir=run_dir, format="adapter"))
    result = run(ExportOptions(run_dir=run_dir, format="merged", dtype="bf16"))
    assert result.output.roundtrips[0].passed


def test_a_mismatching_artefact_fails_loudly(run_dir):
    ctx = ExportContext.open(run_dir, check_prompts=4)
    expected = ctx.reference_ids(4, ctx.config.max_new_tokens)

    def off_by_one(
        prompts, max_new_tokens
    ):  # an "exported model" that answers differently on half the prompts
        return [
            list(ids) if i % 2 else [*ids[:-1], (ids[-1] + 1) % 100 if ids else 7]
            for i, ids in enumerate(expected)
        ]

    with pytest.raises(ExportError, match=r"2/4 greedy answers identical .* below the required 95%"):
        check_greedy(ctx, "gguf-test", "fake", off_by_one, 0.95)
    relaxed = check_greedy(ctx, "gguf-test", "fake", off_by_one, 0.5)
    assert relaxed.passed and relaxed.identical == 2 and len(relaxed.mismatches) == 2


def test_quant_must_fit_the_format(run_dir):
    with pytest.raises(ExportError, match="--quant q8_0 does not apply to format merged"):
        run(ExportOptions(run_dir=run_dir, format="merged", quant="q8_0"))


def test_modelfile_template_matches_the_chat_template(tiny_tokenizer):
    family = match_family(tiny_tokenizer, "Route the ticket.")
    assert family is TEMPLATE_FAMILIES["chatml"]
    for probe in PROBES:  # the Go template's Python mirror renders exactly what Jinja renders
        messages = [{"role": m.role, "content": m.content} for m in probe]
        if probe[0].role != "system":
            messages = [{"role": "system", "content": "Route the ticket."}, *messages]
        assert family.render(probe, "Route the ticket.") == tiny_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    text = modelfile("run-q8_0.gguf", family, "Route the ticket.", 512)
    assert text.splitlines()[1] == "FROM ./run-q8_0.gguf"
    assert 'SYSTEM """Route the ticket."""' in text and 'PARAMETER stop "<|im_end|>"' in text


def test_unknown_template_gets_no_modelfile_template(tiny_tokenizer):
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    other.chat_template = (
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    )
    assert match_family(other, None) is None


def test_vllm_command_is_shell_quoted(tmp_path):
    command = vllm_command(
        "base model", adapter=("a", tmp_path / "my adapter"), max_lora_rank=16, context=512, dtype="auto"
    )
    assert command.startswith("vllm serve 'base model' ")
    assert f"'a={tmp_path}/my adapter'" in command and "--max-lora-rank 16" in command


def test_reference_answers_are_computed_once_per_artefact(run_dir, tmp_path):
    first = ExportContext.open(run_dir, check_prompts=3, cache_dir=tmp_path)
    answers = first.reference_ids(3, 4)
    [cached] = tmp_path.glob(".reference-*.json")
    second = ExportContext.open(run_dir, check_prompts=3, cache_dir=tmp_path)
    assert second.reference_ids(3, 4) == answers
    assert "reference" not in second.__dict__  # the training-time model was never loaded
    assert second.reference_ids(3, 5) is not None and len(list(tmp_path.glob(".reference-*.json"))) == 2
    assert json.loads(cached.read_text()) == answers
