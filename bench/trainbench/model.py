"""Random-initialised Llama-shaped models, built directly on the device, and a checkpoint folder for Unsloth.

Nothing is downloaded: the model is built on the meta device (no memory, no init), then every tensor is
made once, on the device, from a seeded normal (linears, embeddings, head) or ones (norms). That is
seconds for an 8B model on a GPU, where a CPU init and a copy would take minutes. For QLoRA each decoder
linear is quantized to NF4 as soon as its bf16 weights exist, one layer at a time, as transformers'
bitsandbytes loader does while reading a checkpoint: the full bf16 model never sits on the GPU, so the
process peak is that of a real QLoRA load.

Unsloth takes a model only through ``FastLanguageModel.from_pretrained(folder)``, so the orchestrator first
writes one random checkpoint folder (:func:`write_checkpoint`: safetensors, config, a small tokenizer)
that the Unsloth processes load.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainbench.flops import DecoderShape

SHAPES = {
    "llama-3.1-8b": DecoderShape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "tiny": DecoderShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512),
}
ROPE_THETA = 500000.0
INIT_STD = 0.02


def hf_config(shape: DecoderShape) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=8192,
        rope_theta=ROPE_THETA,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=False,
    )


def _normal(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.normal_(0.0, INIT_STD, generator=generator)


def _linear4bit(weight: torch.Tensor, spec: Any) -> nn.Module:
    """A bitsandbytes NF4 layer holding ``weight`` (quantized when the parameter reaches the GPU)."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=getattr(torch, spec.compute_dtype),
        compress_statistics=spec.double_quant, quant_type=spec.quant_type, device="meta",
    )  # fmt: skip
    param = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=spec.double_quant, quant_type=spec.quant_type,
        blocksize=spec.blocksize, module=layer,
    )  # fmt: skip
    layer.weight = param.to(weight.device)
    return layer


def random_model(
    shape: DecoderShape,
    device: torch.device,
    dtype: torch.dtype,
    quantization: Any = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> Any:
    """A ``LlamaForCausalLM`` of ``shape`` with random weights on ``device``; NF4 decoder linears if asked.

    ``quantization`` is a :class:`tuneloop.adapters.QuantizationSpec` (4-bit NF4, double quantisation, bf16
    compute: the same settings Unsloth and the transformers QLoRA recipe use); it needs CUDA.
    """
    from transformers import LlamaForCausalLM

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(hf_config(shape), dtype=dtype, attn_implementation=attn_implementation)
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is head:
                continue
            weight = _normal((child.out_features, child.in_features), dtype, device, generator)
            if quantization is not None:
                setattr(parent, name, _linear4bit(weight, quantization))
                del weight
            else:
                child.weight = nn.Parameter(weight)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:  # embeddings and head: normal; norms: ones
                value = (
                    torch.ones(param.shape, dtype=dtype, device=device)
                    if param.dim() == 1
                    else _normal(tuple(param.shape), dtype, device, generator)
                )
                setattr(module, name, nn.Parameter(value))
    rotary = model.model.rotary_emb
    with torch.device(device):  # its buffers are computed from the config, not initialised
        model.model.rotary_emb = type(rotary)(model.config)
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    if quantization is not None:
        model.is_loaded_in_4bit = True  # what transformers' bitsandbytes loader sets; PEFT reads it for 4-bit LoRA
    model.config.use_cache = False
    return model


def _tokenizer() -> Any:
    """A small word-level tokenizer with Llama's special ids: Unsloth loads one from the model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(252)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def write_checkpoint(shape: DecoderShape, folder: Path, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A random bf16 checkpoint (safetensors) with config and tokenizer, for loaders that need a folder."""
    import time

    started = time.perf_counter()
    model = random_model(shape, device, torch.bfloat16, seed=seed)
    built = time.perf_counter() - started
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
    _tokenizer().save_pretrained(folder)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {"folder": str(folder), "bytes": size, "build_s": round(built, 1), "total_s": round(time.perf_counter() - started, 1)}
