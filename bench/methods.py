"""LoRA, QLoRA, DoRA and full fine-tuning of the embedded SmolLM2-135M on BANKING77, one table.

Each method trains from the same config (``examples/banking77/config.yaml``) through the public stages —
``tuneloop.train.run`` then ``tuneloop.evaluate.run`` on the official 3,080-query test split — and
reports held-out accuracy, training time and the peak GPU memory of its training.

    python bench/methods.py --train TRAIN.csv --test TEST.csv --out bench/results/methods-h200.jsonl \
        [--methods lora qlora dora full] [--epochs 1] [--batch-size 64] [--budget-seconds 520]

Methods are skipped (and said so) once ``--budget-seconds`` would be exceeded, so a time-limited machine
returns every finished row. Also ``--dpo``: a DPO run on BANKING77 preference pairs (correct intent vs a
random wrong one), reporting the held-out reward accuracy before and after.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tuneloop import evaluate, train  # noqa: E402
from tuneloop.config import load_config  # noqa: E402

# Per-method learning rates: adapters tolerate ~10x the rate that full fine-tuning does.
LEARNING_RATES = {"lora": 1e-3, "qlora": 1e-3, "dora": 1e-3, "full": 1e-4}


def run_method(method: str, args: argparse.Namespace, out_root: Path) -> dict:
    overrides = {
        "train_file": str(args.train),
        "test_file": str(args.test),
        "adapter": method,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": LEARNING_RATES[method],
        "baselines": ["base"],  # the zero-shot base beside each fine-tune (and the evaluate stage expects one)
        "eval_batch_size": 512,
        "output_dir": str(out_root / method),
        "report_to": "none",
        "logging_steps": 25,
    }
    config = load_config(ROOT / "examples/banking77/config.yaml", overrides)
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trained = train.run(config, overwrite=True)
    peak = torch.cuda.max_memory_allocated() if CUDA else 0
    started = time.perf_counter()
    evaluated = evaluate.run(config)
    finetuned = evaluated.metrics["finetuned"]
    return {
        "method": method,
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": LEARNING_RATES[method],
        "accuracy": round(finetuned["accuracy"], 4),
        "macro_f1": round(finetuned["macro_f1"], 4),
        "invalid": finetuned["invalid"],
        "base_accuracy": round(evaluated.metrics["base"]["accuracy"], 4),
        "test_n": finetuned["n"],
        "train_seconds": round(trained.train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - started, 1),
        "tokens_per_s": trained.tokens_per_second,
        "peak_train_memory_gib": round(peak / 2**30, 3),
        "final_loss": trained.final_loss,
        "steps": trained.steps,
        "artifact_mb": round(trained.artifact_bytes / 1e6, 1),
    }


def preference_pairs(path: Path, n: int, seed: int) -> list[dict]:
    """Queries with their intent as ``chosen`` and a different, random intent as ``rejected``."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    labels = sorted({r["category"] for r in rows})
    rng = random.Random(seed)
    rng.shuffle(rows)
    pairs = []
    for row in rows[:n]:
        wrong = rng.choice([label for label in labels if label != row["category"]])
        pairs.append({"prompt": row["text"], "chosen": row["category"], "rejected": wrong})
    return pairs


def run_dpo(args: argparse.Namespace, out_root: Path) -> dict:
    data = out_root / "dpo-data"
    data.mkdir(parents=True, exist_ok=True)
    for name, source, n in (("train", args.train, args.dpo_pairs), ("validation", args.test, 500)):
        rows = preference_pairs(source, n, seed=1 if name == "train" else 2)
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = {
        "method": "dpo",
        "train_file": str(data / "train.jsonl"),
        "validation_file": str(data / "validation.jsonl"),
        "test_file": None,
        "adapter": "lora",
        "epochs": 1,
        "batch_size": 32,
        "learning_rate": 5e-4,
        "dpo_beta": 0.1,
        "output_dir": str(out_root / "dpo"),
        "report_to": "none",
        "logging_steps": 10,
    }
    config = load_config(ROOT / "examples/banking77/config.yaml", overrides)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    result = train.run(config, overwrite=True)
    record = json.loads((Path(config.output_dir) / "record.json").read_text())
    return {
        "method": "dpo (lora, from the base)",
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "train_pairs": args.dpo_pairs,
        "validation_pairs": 500,
        "validation_before": record["dpo"]["validation_before_training"],
        "validation_after": result.validation,
        "train_seconds": round(result.train_seconds, 1),
        "peak_train_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if CUDA else None,
        "steps": result.steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/methods.jsonl")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/tuneloop-bench-runs"))
    parser.add_argument("--methods", nargs="*", default=["lora", "qlora", "dora", "full"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--budget-seconds", type=float, default=520)
    parser.add_argument("--dpo", action="store_true")
    parser.add_argument("--dpo-pairs", type=int, default=2000)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [("dpo", None)] if args.dpo else []
    jobs += [("method", m) for m in args.methods]
    slowest = 0.0
    for kind, method in jobs:
        elapsed = time.perf_counter() - started
        if elapsed + slowest * 1.2 > args.budget_seconds:
            row = {"method": method or "dpo", "skipped": f"time budget ({elapsed:.0f} s used)"}
        else:
            job_start = time.perf_counter()
            try:
                row = run_dpo(args, args.runs) if kind == "dpo" else run_method(method, args, args.runs)
            except Exception as exc:  # keep the other methods' numbers
                row = {"method": method or "dpo", "error": f"{type(exc).__name__}: {exc}"[:2000]}
            slowest = max(slowest, time.perf_counter() - job_start)
        print(json.dumps(row), flush=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
