"""tuneloop's fast path vs Unsloth and the Hugging Face stacks, side by side, in one command (issue 7).

Each stack runs in its own process on the same random-initialised Llama-3.1-8B-shaped model (hidden 4096,
32 layers, 32/8 heads, intermediate 14336, vocab 128256, rope theta 500000, bf16) with LoRA r=16 on every
decoder linear and AdamW on the adapters, on the same batches:

* workload ``a``: 2 x 2,048 tokens, every token trained;
* workload ``b``: 16 short chat examples per batch (BANKING77 prompt lengths + log-normal long-tail chat),
  loss on the answers only; peers pad each batch, tuneloop packs it padding-free.

One JSON line per (stack, method, workload) on stdout and in ``OUT_DIR/train_throughput.jsonl``: ``stack``,
``method`` (lora/qlora), ``workload``, ``tok_per_s`` (real tokens only), ``peak_gib``, ``mfu`` (model FLOPs
of bench/trainbench/flops.py over the 989 TFLOP/s bf16 datasheet peak), ``gpu``, and warm-up seconds,
step times, first-step loss, versions. See bench/README.md for the stacks and the device command.

    python bench/train_throughput.py --out-dir OUT_DIR [--only unsloth:lora tuneloop:lora@unsloth-memory ...]
    python bench/train_throughput.py --list                          # the job names, in the order they run
    python bench/train_throughput.py --dry-run --out-dir /tmp/tp     # CPU: tiny shape, hf+peft and tuneloop
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "src"))


def _budget(text: str) -> tuple[str, float]:
    name, _, gib = text.partition("=")
    return name, float(gib)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/tuneloop-throughput"))
    p.add_argument("--only", nargs="*", help="job names (default: all), e.g. unsloth:lora hf+peft:qlora")
    p.add_argument("--workloads", nargs="*", default=["a", "b"], choices=["a", "b"])
    p.add_argument("--shape", default="llama-3.1-8b", choices=["llama-3.1-8b", "tiny"])
    p.add_argument("--dry-run", action="store_true", help="tiny shape, hf+peft and tuneloop LoRA, few steps (CPU)")
    p.add_argument("--list", action="store_true", help="print the job names in the order they run, and exit")
    p.add_argument("--peers-dir", type=Path, default=Path("/tmp/peers"), help="where bench/gpu_setup.sh unpacked")
    p.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/tuneloop-bench-checkpoint"))
    p.add_argument("--budget-seconds", type=float, default=540, help="no job starts after this many seconds")
    p.add_argument("--min-job-seconds", type=float, default=45, help="a job needs at least this much time left")
    p.add_argument("--job-timeout", type=float, default=200, help="one process's limit")
    p.add_argument("--warmup-a", type=int, default=3)
    p.add_argument("--timed-a", type=int, default=6)
    p.add_argument("--warmup-b", type=int, default=4)
    p.add_argument("--timed-b", type=int, default=8)
    # internal: one stack's process, and the checkpoint writer
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stack", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=_budget, action="append", help=argparse.SUPPRESS)
    p.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        from trainbench.orchestrate import PLAN

        print("\n".join(job.name for job in PLAN))
        return 0
    if args.worker:
        from trainbench.worker import run

        return run(args)
    if args.write_checkpoint:
        import json

        import torch
        from trainbench.model import SHAPES, write_checkpoint

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(json.dumps(write_checkpoint(SHAPES[args.shape], args.write_checkpoint, device)), flush=True)
        return 0
    if args.dry_run:
        args.shape = "tiny"
        args.warmup_a = args.warmup_b = 1
        args.timed_a = args.timed_b = 2
    from trainbench.orchestrate import orchestrate

    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
