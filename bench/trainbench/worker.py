"""One stack in one process: build it for each workload, warm it up, time it, write one JSON row per workload.

The orchestrator (:mod:`trainbench.orchestrate`) starts one such process per stack and method, so a stack
that patches transformers on import (Unsloth) or on use (Liger) touches nothing else, and a crash or an
out-of-memory loses only that process's rows.

Per workload: free the previous model, reset the peak-memory counters, build the stack (the build's own
peak counts: a real load holds those bytes too), run the warm-up batches (compilation and autotuning
happen there; their seconds are reported apart, and the first step's loss is read as a sanity check: near
``ln(vocab)`` for random weights), then the timed batches between two synchronisations. Tokens/s counts
real tokens only: padding a stack computes is its own cost.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import time
import traceback
from importlib import metadata
from itertools import pairwise
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "accelerate", "triton", "bitsandbytes", "liger-kernel", "unsloth",
            "unsloth_zoo", "trl")  # fmt: skip


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _sig(x: float) -> float:
    """Four significant digits: readable for the 8B shape, still non-zero for the tiny CPU one."""
    return float(f"{x:.4g}")


def _gib(n: int) -> float:
    return round(n / 2**30, 3)


def measure(stack_name: str, method: str, workload: Any, args: Any, budget: float | None) -> dict[str, Any]:
    import torch

    from trainbench.flops import batch_flops, mfu
    from trainbench.model import SHAPES
    from trainbench.stacks import LORA_RANK, StackContext, get_stack
    from trainbench.workloads import batch_counts

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    shape = SHAPES[args.shape]
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    left_over = torch.cuda.memory_allocated() if cuda else 0  # from an earlier workload of this process; 0 if freed
    checkpoint_folder = Path(args.checkpoint) if args.checkpoint else None
    ctx = StackContext(shape, device, method, workload, budget, checkpoint_folder, args.checkpointing)
    started = time.perf_counter()
    trainer = get_stack(stack_name).build(ctx)
    build_s = time.perf_counter() - started
    build_peak = torch.cuda.max_memory_allocated() if cuda else 0
    warm = [trainer.inputs(b) for b in workload.warmup]
    timed = [trainer.inputs(b) for b in workload.timed]

    started = time.perf_counter()
    first_loss = None
    for i, inputs in enumerate(warm):
        loss = trainer.step(inputs)
        if i == 0:
            first_loss = float(loss)  # synchronises; fine in the warm-up
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started

    events = [torch.cuda.Event(enable_timing=True) for _ in range(len(timed) + 1)] if cuda else []
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    cpu_marks = [started]
    for i, inputs in enumerate(timed):
        if cuda:
            events[i].record()
        trainer.step(inputs)
        cpu_marks.append(time.perf_counter())
    if cuda:
        events[-1].record()
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if cuda:
        step_s = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(len(timed))]
    else:
        step_s = [b - a for a, b in pairwise(cpu_marks)]

    counts = [batch_counts(b) for b in workload.timed]
    real = sum(c.real for c in counts)
    flops = sum(batch_flops(shape, c.lengths, LORA_RANK) for c in counts)
    processed = real if trainer.layout == "packed" else sum(c.padded for c in counts)
    row = {
        "stack": stack_name,
        "method": method,
        "workload": workload.name,
        "tok_per_s": round(real / seconds, 1),
        "peak_gib": _gib(max(build_peak, torch.cuda.max_memory_allocated())) if cuda else None,
        "peak_reserved_gib": _gib(torch.cuda.max_memory_reserved()) if cuda else None,
        "build_peak_gib": _gib(build_peak) if cuda else None,
        "allocated_at_start_gib": _gib(left_over) if cuda else None,
        "mfu": _sig(mfu(flops, seconds)),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "layout": trainer.layout,
        "examples_per_batch": workload.examples_per_batch,
        "seq": max(max(c.lengths) for c in counts),  # the longest example timed (workload a: every one)
        "mean_example_tokens": round(real / sum(len(c.lengths) for c in counts), 1),
        "steps_timed": len(timed),
        "warmup_steps": len(warm),
        "warmup_s": round(warmup_s, 2),
        "build_s": round(build_s, 2),
        "timed_s": round(seconds, 3),
        "step_s": [round(s, 4) for s in step_s],
        "real_tokens": real,
        "processed_tokens": processed,
        "trained_tokens": sum(c.trained for c in counts),
        "padding_share": round(1 - real / processed, 4) if processed else 0.0,
        "model_gflop_per_real_token": _sig(flops / real / 1e9),
        "first_loss": round(first_loss, 4) if first_loss is not None else None,
        "ln_vocab": round(math.log(shape.vocab), 4),
        "shape": args.shape,
        "workload_desc": workload.description,
        **({"memory_budget_gib": budget} if stack_name == "tuneloop" else {}),
        **trainer.info,
        "versions": versions(),
    }
    trainer.close()
    del trainer, warm, timed
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def run(args: Any) -> int:
    """Worker entry: the stack's first import (Unsloth) before anything imports transformers; tuneloop's
    process gets the CUDA allocator default ``tuneloop train`` sets (as Unsloth's import sets its own)."""
    if args.stack == "tuneloop":
        from tuneloop.cli.environment import default_cuda_allocator

        default_cuda_allocator(os.environ)
    from trainbench.stacks import get_stack

    stack = get_stack(args.stack)
    if stack.first_import:
        importlib.import_module(stack.first_import)
    from trainbench.model import SHAPES
    from trainbench.workloads import build

    budgets = dict(args.budget or [])
    failures = 0
    for name in args.workloads:
        steps = {"a": (args.warmup_a, args.timed_a), "b": (args.warmup_b, args.timed_b)}[name]
        try:
            workload = build(name, SHAPES[args.shape].vocab, *steps, small=args.shape == "tiny")
            row = measure(args.stack, args.method, workload, args, budgets.get(name))
        except Exception as exc:  # noqa: BLE001  (one failing workload must not lose the other's row)
            failures += 1
            row = {"stack": args.stack, "method": args.method, "workload": name,
                   "error": f"{type(exc).__name__}: {exc}"[:1500], "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
            gc.collect()
        with Path(args.result_file).open("a") as handle:
            handle.write(json.dumps(row) + "\n")
    return 1 if failures else 0
