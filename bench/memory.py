"""Peak GPU memory of training steps vs ``tuneloop estimate``, on random-initialised models of real shapes.

No weights are downloaded: each model is built from its architecture (SmolLM2-135M, Llama-3.2-1B,
Llama-3.1-8B shapes) with random weights directly on the GPU; QLoRA models are quantized to NF4 (double
quantisation) layer by layer with bitsandbytes, as transformers does while loading. Then the real training
pieces run a few optimizer steps — the adapter registry, gradient checkpointing, the optimizer registry,
the trained-token loss under bf16 autocast — on sequences of exactly ``batch x seq`` tokens, all trained.

    python bench/memory.py --out bench/results/memory-h200.jsonl [--only NAME ...]

One JSON line per configuration: measured peak (``torch.cuda.max_memory_allocated``), the estimate's
peak for the same setting, their ratio, step time and the device name.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tuneloop.adapters import get_adapter_method  # noqa: E402
from tuneloop.config import validate_config  # noqa: E402
from tuneloop.train.estimate import ModelShape, estimate  # noqa: E402
from tuneloop.train.loss import TrainedTokenLoss  # noqa: E402
from tuneloop.train.optim import build_optimizer  # noqa: E402
from tuneloop.train.setup import enable_gradient_checkpointing  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}  # fmt: skip

# name: (shape, adapter, optimizer, batch, seq, gradient checkpointing)
CONFIGS = {
    "135m-lora-b16-s512": ("smollm2-135m", "lora", "adamw", 16, 512, False),
    "135m-lora-b16-s512-gc": ("smollm2-135m", "lora", "adamw", 16, 512, True),
    "135m-full-b8-s512": ("smollm2-135m", "full", "adamw", 8, 512, False),
    "135m-dora-b8-s512": ("smollm2-135m", "dora", "adamw", 8, 512, False),
    "1b-lora-b4-s1024-8bit": ("llama-3.2-1b", "lora", "adamw_8bit", 4, 1024, False),
    "1b-qlora-b4-s2048-gc": ("llama-3.2-1b", "qlora", "paged_adamw_8bit", 4, 2048, True),
    "8b-qlora-b1-s2048-gc": ("llama-3.1-8b", "qlora", "adamw", 1, 2048, True),
    "8b-qlora-b1-s2048": ("llama-3.1-8b", "qlora", "adamw", 1, 2048, False),
}


def hf_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=8192, **SHAPES[shape])


def quantize_linears_(model: torch.nn.Module, spec) -> None:
    """Replace every decoder linear layer by a bitsandbytes NF4 layer holding its (random) weights."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or child is head:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None,
                compute_dtype=getattr(torch, spec.compute_dtype), compress_statistics=spec.double_quant,
                quant_type=spec.quant_type, device="meta",
            )  # fmt: skip
            weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=spec.double_quant,
                quant_type=spec.quant_type, blocksize=spec.blocksize, module=layer,
            )  # fmt: skip
            layer.weight = weight.to(child.weight.device)
            setattr(parent, name, layer)
            del child, weight
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes loader sets; PEFT reads it to pick 4-bit LoRA
    torch.cuda.empty_cache()


def build(shape: str, adapter: str, config) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    method = get_adapter_method(adapter)
    dtype = torch.float32 if method.master_weights_fp32 else torch.bfloat16
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(hf_config(shape), dtype=dtype)
    if method.quantization is not None:
        quantize_linears_(model, method.quantization)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return method.apply(model, config)


def measure(name: str, steps: int) -> dict:
    shape, adapter, optimizer, batch, seq, checkpointing = CONFIGS[name]
    config = validate_config({
        "base_model": shape, "train_file": "unused.csv", "adapter": adapter, "optimizer": optimizer,
        "batch_size": batch, "max_seq_len": seq, "gradient_checkpointing": checkpointing, "precision": "bf16",
        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
    })  # fmt: skip
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(shape, adapter, config)
    torch.cuda.synchronize()
    after_build = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()  # random init / quantization transients are not training memory
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(optimizer, trainable, lr=1e-4, weight_decay=0.0, device=torch.device("cuda"))
    loss_module = TrainedTokenLoss(model).train()
    vocab = SHAPES[shape]["vocab_size"]
    generator = torch.Generator(device="cuda").manual_seed(0)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=generator)
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[-1, -1] = 0  # one padded position, as in real batches: attention takes the masked path
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, count = loss_module(input_ids=ids, attention_mask=mask, labels=ids)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated()
    estimated = estimate(config, ModelShape.from_hf_config(hf_config(shape)), compiled=False)  # eager layers here
    chosen = estimated.with_checkpointing if checkpointing else estimated.without_checkpointing
    row = {
        "name": name,
        "device": torch.cuda.get_device_name(),
        "shape": shape,
        "adapter": adapter,
        "optimizer": optimizer,
        "batch": batch,
        "seq": seq,
        "gradient_checkpointing": checkpointing,
        "trainable_params": sum(p.numel() for p in trainable),
        "memory_after_build_gib": round(after_build / 2**30, 3),
        "measured_peak_gib": round(peak / 2**30, 3),
        "estimated_peak_gib": round(chosen.peak / 2**30, 3),
        "estimate_over_measured": round(chosen.peak / peak, 3),
        "estimated_components_gib": {k: round(v / 2**30, 3) for k, v in chosen.components.items()},
        "step_seconds": [round(t, 3) for t in times],
        "tokens_per_s": round(batch * seq / min(times), 1),
        "versions": {"torch": torch.__version__},
    }
    del model, opt, loss_module, trainable
    gc.collect()  # free this configuration's model before the next one is measured
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/memory.jsonl")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only or CONFIGS:
        try:
            row = measure(name, args.steps)
        except Exception as exc:  # one failing configuration must not lose the others' numbers
            row = {"name": name, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
