"""Write a merged Llama-architecture model as a GGUF file with the ``gguf`` package (llama.cpp's gguf-py).

What llama.cpp and Ollama need from the file, and where each piece comes from:

* **tensors**, renamed with gguf-py's ``TensorNameMap`` (``model.layers.0.self_attn.q_proj.weight`` ->
  ``blk.0.attn_q.weight``). The q/k projections are permuted from Hugging Face's rotate-half RoPE layout to
  llama.cpp's interleaved one (what ``convert_hf_to_gguf.py`` does; transformers' GGUF loader undoes it).
* **hyperparameters** from the model config (heads, kv heads, RMS eps, RoPE base, context length).
* **the tokenizer the model was trained with**: byte-level BPE tokens and merges from ``tokenizer.json``,
  token types (control for special tokens), special token ids, and the pre-tokenizer named by what
  ``tokenizer.json`` actually does (not by what the upstream model used), so llama.cpp splits text exactly
  as training did.
* **``tokenizer.chat_template``**: the run's stored template, so Ollama and llama.cpp render chats like
  training did, and the end-of-turn token id so generation stops where the model learned to stop.

Quantisation types are a registry: ``f16`` and ``q8_0`` are written directly (gguf-py's reference
quantizer); anything else is made from the f16 file by llama.cpp's quantizer (see ``quantize.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneloop.export.context import ExportError


@dataclass(frozen=True)
class TensorType:
    """How 2-D weight matrices are stored; 1-D tensors (norms) always stay f32, as llama.cpp expects."""

    name: str
    file_type: int
    encode: Callable[[np.ndarray], tuple[np.ndarray, Any]]


def _f16(array: np.ndarray) -> tuple[np.ndarray, Any]:
    return array.astype(np.float16), None


def _q8_0(array: np.ndarray) -> tuple[np.ndarray, Any]:
    import gguf

    if array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
        return _f16(array)  # rows not a whole number of 32-blocks: llama.cpp's converter also falls back
    qtype = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def direct_types() -> dict[str, TensorType]:
    import gguf

    return {
        "f16": TensorType("f16", int(gguf.LlamaFileType.MOSTLY_F16), _f16),
        "q8_0": TensorType("q8_0", int(gguf.LlamaFileType.MOSTLY_Q8_0), _q8_0),
    }


# --- pre-tokenizers: which llama.cpp split rule reproduces the tokenizer.json's ------------------------------

_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _matches(actual: Any, expected: dict[str, Any]) -> bool:
    return isinstance(actual, dict) and all(actual.get(k) == v for k, v in expected.items())


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of this ``tokenizer.json``; unknown rules are refused.

    A wrong name here does not fail loudly anywhere: llama.cpp would silently split text differently from
    training. So only shapes known to be equivalent are mapped.
    """
    pre = tokenizer_json.get("pre_tokenizer")
    if _matches(pre, _BYTE_LEVEL):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and _matches(steps[0], {"type": "Digits", "individual_digits": True})
        and _matches(steps[1], _BYTE_LEVEL)
    ):
        return "smollm"
    if (
        len(steps) == 2
        and _matches(steps[0], {"type": "Split", "behavior": "Isolated"})
        and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_REGEX
        and _matches(steps[1], {"type": "ByteLevel", "use_regex": False})
    ):
        return "llama-bpe"
    raise ExportError(
        f"GGUF export: unsupported pre-tokenizer {json.dumps(pre)[:200]}; llama.cpp would split text differently"
    )


def _byte_level_decoder(decoder: Any) -> bool:
    """``ByteLevel``, alone or last after steps that are no-ops on a byte-level vocabulary.

    transformers' GGUF tokenizer builder (5.17) writes ``ByteFallback, Fuse, Replace('▁', ' '), ByteLevel``:
    byte-level token strings never hold ``<0x..>`` or a literal ``▁``, so it decodes exactly like ``ByteLevel``.
    """
    if _matches(decoder, {"type": "ByteLevel"}):
        return True
    steps = (
        decoder.get("decoders", []) if isinstance(decoder, dict) and decoder.get("type") == "Sequence" else []
    )
    harmless = all(
        step.get("type") in ("ByteFallback", "Fuse")
        or (step.get("type") == "Replace" and step.get("pattern") == {"String": "\u2581"})
        for step in steps[:-1]
    )
    return bool(steps) and harmless and _matches(steps[-1], {"type": "ByteLevel"})


# --- the writer ---------------------------------------------------------------------------------------------


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ExportError(f"GGUF export: RoPE scaling {rope_type!r} is not supported yet")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ExportError("GGUF export: the model config has no rope_theta")
    return float(theta)


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's half-split RoPE rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_llama_gguf(
    model: Any,
    tokenizer: Any,
    chat_template: str,
    eot_token_id: int,
    path: Path,
    tensor_type: TensorType,
    name: str,
) -> dict[str, Any]:
    """Write ``model`` (a plain fp32 ``LlamaForCausalLM``) and its tokenizer to ``path``; returns a summary."""
    import gguf

    config = model.config
    if config.model_type != "llama":
        raise ExportError(
            f"GGUF export supports Llama-architecture models (SmolLM2, Llama, ...); this model is {config.model_type!r}"
        )
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(tensor_type.file_type)
    if tensor_type.name != "f16":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size, chat_template, eot_token_id)

    counts: dict[str, int] = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if "rotary_emb" in hf_name:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        if data.ndim == 1:
            stored, raw = data.astype(np.float32), None
        else:
            stored, raw = tensor_type.encode(data)
        kind = raw.name.lower() if raw is not None else str(stored.dtype)
        counts[kind] = counts.get(kind, 0) + 1
        writer.add_tensor(gguf_name, stored, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensor_types": counts, "bytes": path.stat().st_size}


def _add_tokenizer(
    writer: Any, tokenizer: Any, vocab_size: int, chat_template: str, eot_token_id: int
) -> None:
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model.get("type") != "BPE" or not _byte_level_decoder(backend.get("decoder")):
        raise ExportError("GGUF export supports byte-level BPE tokenizers (GPT-2 style) only")
    normalizer = backend.get("normalizer")
    if normalizer is not None and normalizer != {"type": "Sequence", "normalizers": []}:
        raise ExportError("GGUF export: a tokenizer with a normalizer has no llama.cpp byte-level equivalent")
    pre = pre_tokenizer_name(backend)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {entry["id"]: entry for entry in backend.get("added_tokens", [])}
    for token_id, entry in added.items():
        vocab[entry["content"]] = token_id
    if max(vocab.values()) >= vocab_size:
        raise ExportError(
            f"GGUF export: the tokenizer has ids up to {max(vocab.values())}, the model only {vocab_size} rows"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, token_id in vocab.items():
        tokens[token_id] = token
        types[token_id] = gguf.TokenType.NORMAL
    for token_id, entry in added.items():
        types[token_id] = gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    probe = tokenizer("a")["input_ids"]
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_eot_token_id(eot_token_id)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(chat_template)
