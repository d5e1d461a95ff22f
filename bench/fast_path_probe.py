"""Throughput and peak memory of the fast-path variants on one GPU (issue 7): compile, checkpointing, head loss.

A random-initialised Llama of a real shape (``--shape 8b|1b|135m``; no weights are downloaded), bf16, LoRA
r=16 on every linear layer but the head, dropout 0, AdamW, all tokens trained, batch x seq tokens of random
ids. Each variant builds its model afresh and runs forward + backward + optimizer step:

* ``kernels``: ``eager`` or ``compile`` (Inductor, per decoder layer, through ``apply_fast_path``);
* ``checkpointing``: ``none``, ``all``, or ``auto`` (the planner's choice for ``--budget-gib``);
* ``head``: ``chunked`` (checkpointed chunks, head recomputed: the old path) or ``fused`` (fused linear CE).

A variant is named ``<kernels>-<checkpointing>-<head>``, e.g. ``compile-auto-fused``. Per variant: the first
step alone (it includes compiling), 3 warm-up steps, then 5 timed steps; the peak is
``torch.cuda.max_memory_allocated`` over the timed steps. One JSON line per variant on stdout (and appended
to ``--out``). The default variant list fits in ~4 minutes on an H200 for the 8b shape; ``--max-seconds``
skips what would run past it (printed as skipped).

    python bench/fast_path_probe.py --shape 8b --out bench/results/fast-path-h200.jsonl
    python bench/fast_path_probe.py --shape 8b --variants compile-none-fused,compile-auto-fused --budget-gib 30.5
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tuneloop.adapters import get_adapter_method  # noqa: E402
from tuneloop.config import validate_config  # noqa: E402
from tuneloop.train.estimate import GIB  # noqa: E402
from tuneloop.train.fast import apply_fast_path  # noqa: E402
from tuneloop.train.fast.linear_ce import fused_linear_cross_entropy  # noqa: E402
from tuneloop.train.loss import _backbone_and_head, chunk_tokens, chunked_head_loss  # noqa: E402
from tuneloop.train.optim import build_optimizer  # noqa: E402

SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}  # fmt: skip
KERNELS = ("eager", "compile")
CHECKPOINTING = {"none": False, "all": True, "auto": "auto"}
HEADS = ("chunked", "fused")
ALL_VARIANTS = tuple("-".join(v) for v in itertools.product(KERNELS, CHECKPOINTING, HEADS))
# cheap ones first, so a time limit cuts the expensive ones: the old path, the fused head, then compile
DEFAULT_VARIANTS = ("eager-all-chunked", "eager-all-fused", "eager-none-fused", "compile-all-fused", "compile-auto-fused")


def build(shape: str, config) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(LlamaConfig(max_position_embeddings=8192, **SHAPES[shape]), dtype=torch.bfloat16)
    model.config.use_cache = False
    return get_adapter_method("lora").apply(model, config)


def head_loss_fn(head_variant: str, head: torch.nn.Module, vocab: int):
    chunk = chunk_tokens(vocab)
    if head_variant == "fused":
        return lambda hidden, targets: fused_linear_cross_entropy(hidden, head.weight, targets, bias=head.bias, chunk_rows=chunk)
    return lambda hidden, targets: chunked_head_loss(head, hidden, targets, chunk)


def run_variant(name: str, args: argparse.Namespace) -> dict:
    kernels, checkpointing, head_variant = name.split("-")
    config = validate_config({
        "base_model": args.shape, "train_file": "unused.csv", "adapter": "lora", "optimizer": "adamw",
        "batch_size": args.batch, "max_seq_len": args.seq, "precision": "bf16", "lora_r": 16, "lora_alpha": 32,
        "lora_dropout": 0.0, "kernels": kernels, "gradient_checkpointing": CHECKPOINTING[checkpointing],
        "memory_budget_gib": args.budget_gib,
    })  # fmt: skip
    torch._dynamo.reset()  # each variant compiles as a fresh run would (Inductor's on-disk cache stays warm)
    torch.cuda.empty_cache()
    started = time.perf_counter()
    model = build(args.shape, config)
    tokens = args.batch * args.seq
    report = apply_fast_path(model, config, device=torch.device("cuda"), tokens_per_micro_batch=tokens, autocast_dtype=torch.bfloat16)
    setup_seconds = time.perf_counter() - started
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer("adamw", trainable, lr=1e-4, weight_decay=0.0, device=torch.device("cuda"))
    decoder, head = _backbone_and_head(model)
    vocab = SHAPES[args.shape]["vocab_size"]
    loss_of = head_loss_fn(head_variant, head, vocab)
    generator = torch.Generator(device="cuda").manual_seed(0)
    model.train()

    def step() -> tuple[float, float]:
        ids = torch.randint(0, vocab, (args.batch, args.seq), device="cuda", generator=generator)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = decoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            targets = ids[:, 1:].reshape(-1)
            loss = loss_of(hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets) / targets.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start, float(loss)

    first_seconds, first_loss = step()
    for _ in range(args.warmup):
        step()
    peak_with_warmup = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    timed = [step() for _ in range(args.steps)]
    seconds = [t for t, _ in timed]
    row = {
        "variant": name,
        "device": torch.cuda.get_device_name(),
        "shape": args.shape,
        "batch": args.batch,
        "seq": args.seq,
        "kernels_used": report.kernels,
        "checkpointed_layers": f"{report.checkpointed_layers}/{report.total_layers}",
        "offload": report.offload,
        "predicted_peak_gib": report.predicted_peak_gib,
        "budget_gib": report.budget_gib,
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "peak_incl_first_steps_gib": round(peak_with_warmup / GIB, 2),
        "tokens_per_s": round(tokens * len(seconds) / sum(seconds), 1),
        "step_s": [round(t, 3) for t in seconds],
        "first_step_s": round(first_seconds, 2),
        "setup_s": round(setup_seconds, 2),
        "loss_first": round(first_loss, 4),
        "loss_last": round(timed[-1][1], 4),
        "reasons": list(report.reasons),
        "versions": {"torch": torch.__version__},
    }
    return row  # the model and optimizer are freed with this frame; main() collects before the next variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, or 'all': {', '.join(ALL_VARIANTS)}")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--budget-gib", type=float, default=30.5, help="memory budget of the 'auto' variants (Unsloth's 8B peak)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=230.0, help="skip variants that start after this")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    variants = ALL_VARIANTS if args.variants == "all" else tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(ALL_VARIANTS)}")
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "bench/fast_path_probe.py measures GPU throughput and memory; no CUDA device here"}))
        return
    began = time.perf_counter()
    for name in variants:
        if time.perf_counter() - began > args.max_seconds:
            row = {"variant": name, "skipped": f"past --max-seconds {args.max_seconds:g}"}
        else:
            try:
                row = run_variant(name, args)
            except Exception as exc:  # one failing variant (e.g. out of memory) must not lose the others' numbers
                row = {"variant": name, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            gc.collect()  # after the except block: the traceback no longer holds the failed variant's model
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(json.dumps(row), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
