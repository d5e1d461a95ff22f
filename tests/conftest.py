"""Shared fixtures: a tiny random Llama with a real BPE tokenizer and chat template, built offline.

The tokenizer is trained on a few sentences at session start (no hub), with the ChatML special tokens and
template SmolLM2 uses, so rendering and masking are exercised exactly as on real models.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Classify the message into exactly one of these categories: billing, bug_report, onboarding.",
    "I was charged twice for my subscription this month, please refund the second charge.",
    "The dashboard crashes every time I open the export menu in Firefox.",
    "How do I invite my team to the new workspace and set their roles?",
    "Answer with the category name only. system user assistant hello world",
    "Ünïcödé text — with dashes, émojis 🎉 and numbers 0123456789 !?.,;:'\"()[]{}",
]

LABELS = ("billing", "bug_report", "onboarding")

TICKETS = [
    ("refund my second charge please", "billing"),
    ("charged twice this month", "billing"),
    ("invoice has the wrong amount", "billing"),
    ("card declined on renewal", "billing"),
    ("dashboard crashes on export", "bug_report"),
    ("the page is blank after login", "bug_report"),
    ("export gives a corrupt file", "bug_report"),
    ("app freezes when I drag a card", "bug_report"),
    ("how do I invite my team", "onboarding"),
    ("where do I set roles for members", "onboarding"),
    ("how to import a spreadsheet", "onboarding"),
    ("best way to start a first project", "onboarding"),
]

VALIDATION = [
    ("my receipt shows the old price", "billing"),
    ("clicking save does nothing at all", "bug_report"),
    ("what is a guest account for", "onboarding"),
]

TEST = [
    ("why did the renewal cost more", "billing"),
    ("please send a copy of last invoice", "billing"),
    ("timeline view flickers and goes white", "bug_report"),
    ("search returns nothing since update", "bug_report"),
    ("can you show me how templates work", "onboarding"),
    ("is there a training video for admins", "onboarding"),
]


def _build_tiny_model(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.3,  # spread-out logits, so per-token losses differ between examples
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a random 2-layer Llama (hidden 32) and its ChatML tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    _build_tiny_model(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from tuneloop.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> dict[str, Path]:
    """train/validation/test CSVs of the three-label toy ticket task."""
    return {
        "train": write_csv(tmp_path / "train.csv", TICKETS),
        "validation": write_csv(tmp_path / "validation.csv", VALIDATION),
        "test": write_csv(tmp_path / "test.csv", TEST),
    }


def tiny_run_settings(model_dir: Path, dataset: dict[str, Path], output_dir: Path) -> dict[str, object]:
    """Config keys of a fast, deterministic run of the tiny model on the toy ticket task."""
    return {
        "base_model": str(model_dir),
        "task": "classification",
        "train_file": str(dataset["train"]),
        "validation_file": str(dataset["validation"]),
        "test_file": str(dataset["test"]),
        "output_dir": str(output_dir),
        "epochs": 2,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "precision": "fp32",
        "logging_steps": 1,
        "few_shot_k": 3,
        "max_new_tokens": 4,
    }


@pytest.fixture
def tiny_config(tiny_model_dir: Path, tiny_dataset: dict[str, Path], tmp_path: Path) -> Callable[..., object]:
    """Factory: a validated RunConfig for the tiny model, with keyword overrides."""
    from tuneloop.config import validate_config

    def make(**overrides: object):
        return validate_config({**tiny_run_settings(tiny_model_dir, tiny_dataset, tmp_path / "run"), **overrides})

    return make


@pytest.fixture(scope="session")
def llama8b():
    """The Llama-3.1-8B architecture as the memory estimate sees it (counted on the meta device, no weights)."""
    from transformers import LlamaConfig

    from tuneloop.train.estimate import ModelShape

    return ModelShape.from_hf_config(
        LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    )  # fmt: skip


@pytest.fixture
def fresh_dynamo():
    """Compiled code is cached per process on the layers' shared code: a test that counts graphs starts from none."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
