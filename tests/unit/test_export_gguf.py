"""The GGUF writer on the tiny Llama: names, RoPE permutation, tokenizer metadata, read back by transformers."""

from __future__ import annotations

import pytest
import torch

from tuneloop.export import ExportError
from tuneloop.export.gguf_llama import direct_types, pre_tokenizer_name, write_llama_gguf

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _write(tiny, path, kind):
    model, tokenizer = tiny
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return write_llama_gguf(
        model, tokenizer, tokenizer.chat_template, eot, path, direct_types()[kind], "tiny"
    )


@pytest.mark.parametrize("kind, tolerance", [("f16", 0.05), ("q8_0", 1.0)])
def test_transformers_reads_back_the_same_model(tiny, tmp_path, kind, tolerance):
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"tiny-{kind}.gguf"
    summary = _write(tiny, path, kind)
    assert summary["bytes"] == path.stat().st_size
    assert summary["tensor_types"].get("float32") == 5  # four layer norms + the final norm stay f32
    assert summary["tensor_types"].get("float16" if kind == "f16" else "q8_0") == 15
    loaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    model, tokenizer = tiny
    # positions > 0 matter: a wrong q/k permutation only shows once RoPE rotates
    ids = torch.tensor([tokenizer.encode("I was charged twice for my subscription this month")])
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert got.shape == expected.shape
    assert float((expected - got).abs().max()) < tolerance
    if kind == "f16":
        assert torch.equal(expected.argmax(-1), got.argmax(-1))


def test_tokenizer_and_chat_template_survive(tiny, tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "tiny-f16.gguf"
    _write(tiny, path, "f16")
    _, tokenizer = tiny
    rebuilt = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert rebuilt.get_vocab() == tokenizer.get_vocab()
    assert rebuilt.chat_template == tokenizer.chat_template
    assert (rebuilt.eos_token, rebuilt.bos_token) == ("<|im_end|>", "<|im_start|>")
    text = "<|im_start|>user\nÜnïcödé 🎉 123 <|im_end|>\n<|im_start|>assistant\n"
    assert rebuilt.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)

    import gguf

    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == tokenizer.convert_tokens_to_ids(
        "<|im_end|>"
    )
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == gguf.TokenType.CONTROL
    assert "output.weight" not in {
        t.name for t in reader.tensors
    }  # tied embeddings: llama.cpp reuses token_embd


def test_pre_tokenizer_is_named_by_what_it_does():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    smollm = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
    }
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    with pytest.raises(ExportError, match="unsupported pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}})
    with pytest.raises(ExportError, match="unsupported pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {**byte_level, "use_regex": False}})


def test_non_llama_architectures_are_refused(tiny, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    _, tokenizer = tiny
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    with pytest.raises(ExportError, match="Llama-architecture"):
        write_llama_gguf(
            MistralForCausalLM(config), tokenizer, "x", 2, tmp_path / "m.gguf", direct_types()["f16"], "m"
        )
    assert not (tmp_path / "m.gguf").exists()


def test_byte_level_decoders_with_no_op_steps_are_accepted():
    from tuneloop.export.gguf_llama import _byte_level_decoder

    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    written_by_gguf_loader = {
        "type": "Sequence",
        "decoders": [
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            byte_level,
        ],
    }
    assert _byte_level_decoder(byte_level) and _byte_level_decoder(written_by_gguf_loader)
    assert not _byte_level_decoder({"type": "Metaspace", "replacement": "\u2581"})
    assert not _byte_level_decoder(
        {"type": "Sequence", "decoders": [{"type": "Strip", "content": " "}, byte_level]}
    )
