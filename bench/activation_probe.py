"""Measure activation memory per token and decoder layer, to derive the coefficients of ``tuneloop estimate``.

Small Llama-architecture models (hidden 256-512, vocabulary 512: the head is negligible) run one training
step under bf16 autocast; the peak allocated memory is measured at two sequence lengths and two depths.
The double difference

    (peak(L=3, T2) - peak(L=3, T1)) - (peak(L=1, T2) - peak(L=1, T1))  /  (2 layers x (T2 - T1) tokens)

cancels weights, optimizer state and every per-model constant, leaving the bytes each extra token costs in
each extra layer at the peak of the step. A least-squares fit over seven shapes gives coefficients of
(hidden, q width, intermediate, LoRA rank, 1). With gradient checkpointing the same difference gives what
each layer keeps per token; ``recompute`` is the single-layer cost at L=1. The head and loss are measured
apart: peak bytes per (trained token x vocabulary entry) of :func:`~tuneloop.train.loss.chunked_head_loss`.

    python bench/activation_probe.py --out bench/results/activation-probe-h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from memory import quantize_linears_  # noqa: E402

from tuneloop.adapters import get_adapter_method  # noqa: E402
from tuneloop.config import validate_config  # noqa: E402
from tuneloop.train.loss import TrainedTokenLoss, chunk_tokens, chunked_head_loss  # noqa: E402
from tuneloop.train.setup import enable_gradient_checkpointing  # noqa: E402

# hidden, intermediate, heads, kv heads, head dim, rank
GRID = [(256, 768, 8, 2, 32, 16), (512, 768, 8, 2, 64, 16), (256, 1536, 8, 2, 32, 16), (256, 768, 8, 4, 32, 16),
        (256, 768, 16, 2, 32, 16), (256, 768, 8, 2, 32, 32), (384, 1024, 6, 3, 64, 8)]  # fmt: skip
VARIANTS = [("lora", 0.05), ("lora", 0.0), ("qlora", 0.05), ("dora", 0.05), ("full", 0.0)]


def peak(method: str, dropout: float, dims: tuple, layers: int, tokens: int, gc: bool, batch: int = 2) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, heads, kv, head_dim, r = dims
    config = validate_config({"train_file": "u.csv", "adapter": method, "lora_r": r, "lora_dropout": dropout, "precision": "bf16"})
    spec = get_adapter_method(method)
    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=512, hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=8192)  # fmt: skip
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(hf, dtype=torch.float32 if spec.master_weights_fp32 else torch.bfloat16)
    if spec.quantization is not None:
        quantize_linears_(model, spec.quantization)
    if gc:
        enable_gradient_checkpointing(model)
    model = spec.apply(model, config)
    loss = TrainedTokenLoss(model).train()
    ids = torch.randint(0, 512, (batch, tokens // batch), device="cuda")
    mask = torch.ones_like(ids)
    mask[-1, -1] = 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, count = loss(input_ids=ids, attention_mask=mask, labels=ids)
    (total / count).backward()
    torch.cuda.synchronize()
    result = torch.cuda.max_memory_allocated()
    del model, loss, total
    torch.cuda.empty_cache()
    return result


def per_token_layer(method: str, dropout: float, dims: tuple, gc: bool) -> tuple[float, float]:
    t1, t2 = 512, 1024
    p = {(L, t): peak(method, dropout, dims, L, t, gc) for L in (1, 3) for t in (t1, t2)}
    slope = ((p[3, t2] - p[3, t1]) - (p[1, t2] - p[1, t1])) / (2 * (t2 - t1))
    single = (p[1, t2] - p[1, t1]) / (t2 - t1)  # one layer + per-token constants (embeddings, norm, small head)
    return slope, single


def fit(rows: list[tuple[list[float], float]]) -> tuple[list[float], float]:
    x = np.array([features for features, _ in rows], dtype=float)
    y = np.array([value for _, value in rows])
    design = np.c_[x, np.ones(len(x))]
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    return [round(float(c), 3) for c in coefficients], float(np.abs(design @ coefficients - y).max())


def head_bytes(vocab: int, tokens: int) -> float:
    head = torch.nn.Linear(576, vocab, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(tokens, 576, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total = chunked_head_loss(head, hidden, targets, chunk_tokens(vocab))
    total.backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / (min(tokens, chunk_tokens(vocab)) * vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "fits": {}}
    for method, dropout in VARIANTS:
        for gc in (False, True):
            slopes, singles = [], []
            for dims in GRID:
                h, i, heads, kv, head_dim, r = dims
                features = [h, heads * head_dim, i, r if method != "full" else 0]
                slope, single = per_token_layer(method, dropout, dims, gc)
                slopes.append((features, slope))
                singles.append((features, single))
            key = f"{method}-dropout{dropout}-{'gc' if gc else 'nogc'}"
            per_layer, residual = fit(slopes)
            single_layer, single_residual = fit(singles)
            result["fits"][key] = {
                "per_token_layer": per_layer, "max_residual": round(residual, 2),
                "single_layer_per_token": single_layer, "single_max_residual": round(single_residual, 2),
            }  # fmt: skip
            print(key, result["fits"][key], flush=True)
    result["head_bytes_per_token_vocab"] = {
        f"V{v}-T{t}": round(head_bytes(v, t), 3) for v in (49152, 128256) for t in (256, 2048, 4096)
    }
    print(result["head_bytes_per_token_vocab"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
