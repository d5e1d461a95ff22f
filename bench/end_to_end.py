"""Workload (c) of issue 7: the embedded model on BANKING77, 2 epochs, end to end through the CLI.

Times ``tuneloop train CONFIG`` as a user runs it (wall clock of the whole command: start-up, model load,
data, compile warm-up, training, saving the adapter), then runs ``tuneloop eval CONFIG`` and prints one JSON
line like bench/train_throughput.py's (``stack``, ``workload: c``, ``train_wall_s``, accuracy, ...),
also appended to ``--out``. Targets: ``train_wall_s`` <= 30, ``accuracy`` >= 0.90.

    python bench/end_to_end.py [--config bench/configs/banking77-fast.yaml] [--set key=value ...] \
        [--out OUT/end_to_end.jsonl] [--skip-eval] [--cold] [--warm-compile]

A GGUF base is converted to safetensors once per machine (tuneloop's model cache); that happens before the
timed command unless ``--cold``, and its seconds are reported as ``model_cache_s``. torch.compile's first
compilation is inside the timed command (what a user's first run on a machine pays); ``--warm-compile``
runs 3 untimed steps first so the timed run finds inductor's on-disk caches filled (``compile_warmup_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _cli(command: str, config: Path, overrides: list[str], extra: list[str]) -> tuple[float, str]:
    """Run one tuneloop subcommand; its wall seconds and output. A failure is an error with the output's tail."""
    argv = [sys.executable, "-m", "tuneloop.cli.main", command, str(config), *extra]
    for item in overrides:
        argv += ["--set", item]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"tuneloop {command} exited {done.returncode}: {output[-2000:]}")
    return seconds, output


def _config(config: Path, overrides: list[str]) -> Any:
    from tuneloop.config import load_config
    from tuneloop.config.loader import parse_override  # the CLI's own --set syntax

    return load_config(config, dict(parse_override(item) for item in overrides))


def _output_dir(config: Path, overrides: list[str]) -> Path:
    out = Path(_config(config, overrides).output_dir)
    return out if out.is_absolute() else ROOT / out  # the CLI runs in ROOT


def _warm_model_cache(config: Path, overrides: list[str]) -> float:
    from tuneloop.models import resolve_model

    started = time.perf_counter()
    resolve_model(_config(config, overrides).base_model)
    return time.perf_counter() - started


def _import_seconds() -> float:
    """Wall seconds of a fresh interpreter importing what ``tuneloop train`` imports (torch, transformers, PEFT and
    whatever they pull in): the part of ``outside_run_s`` that is third-party start-up, not tuneloop's work."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import tuneloop.cli.main, tuneloop.train.sft"], env=env, check=True)
    return time.perf_counter() - started


def _outside_run(wall_s: float, startup: dict[str, float] | None, loop_s: float | None) -> float | None:
    """Seconds of the command spent neither in the run's set-up phases nor in its loop."""
    if not startup or loop_s is None:
        return None
    return round(wall_s - sum(startup.values()) - loop_s, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"stack": "tuneloop", "method": "lora", "workload": "c", "config": str(args.config)}
    out_dir = _output_dir(args.config, args.set)
    row["output_dir"] = str(out_dir)
    if not args.cold:  # a GGUF base is dequantized and cached once per machine, before any run; not a training cost
        row["model_cache_s"] = round(_warm_model_cache(args.config, args.set), 1)
    if args.warm_compile:  # a short untimed run fills torch.compile's on-disk caches, as a user's earlier run would
        warm_out = f"output_dir={out_dir.parent / (out_dir.name + '-compile-warmup')}"
        row["compile_warmup_s"] = round(_cli("train", args.config, [*args.set, "max_steps=3", warm_out], ["--overwrite"])[0], 1)
    row["import_s"] = round(_import_seconds(), 1)
    train_s, _ = _cli("train", args.config, args.set, ["--overwrite"])
    record = json.loads((out_dir / "record.json").read_text())
    train = record["train"]
    row.update({
        "train_wall_s": round(train_s, 1),
        "train_loop_s": train.get("train_seconds"),
        "tok_per_s": train.get("tokens_per_second"),
        "peak_gib": train.get("peak_gpu_memory_gib"),
        "gpu": train.get("device"),
        "epochs": train.get("epochs"),
        "steps": train.get("steps"),
        "final_loss": train.get("final_loss"),
        # where the wall time went: the run's set-up phases (record.json startup_seconds), the loop, and the
        # rest (interpreter start and imports, saving the adapter and record, exit)
        "startup_s": record.get("startup_seconds"),
        "outside_run_s": _outside_run(train_s, record.get("startup_seconds"), train.get("train_seconds")),
        "fast_path": {k: record["config"].get(k) for k in ("packing", "kernels", "gradient_checkpointing",
                                                            "memory_budget_gib", "batch_size", "learning_rate")},
        "versions": record.get("versions"),
    })  # fmt: skip
    if not args.skip_eval:
        eval_s, _ = _cli("eval", args.config, args.set, [])
        metrics = json.loads((out_dir / "eval" / "metrics.json").read_text())
        finetuned = metrics["finetuned"]
        row.update({
            "eval_wall_s": round(eval_s, 1),
            "accuracy": finetuned.get("accuracy"),
            "macro_f1": finetuned.get("macro_f1"),
            "invalid": finetuned.get("invalid"),
            "test_n": finetuned.get("n"),
        })  # fmt: skip
    row["meets_targets"] = row["train_wall_s"] <= 30 and (args.skip_eval or (row.get("accuracy") or 0) >= 0.90)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "bench/configs/banking77-fast.yaml")
    parser.add_argument("--set", action="append", default=[], help="config override, as the CLI's --set")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON line here too")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--cold", action="store_true", help="count the GGUF conversion in the train wall time")
    parser.add_argument("--warm-compile", action="store_true", help="an untimed 3-step run first (compile caches)")
    args = parser.parse_args()
    try:
        row = run(args)
    except Exception as exc:  # noqa: BLE001  (the row says what failed; the command still prints one)
        row = {"stack": "tuneloop", "method": "lora", "workload": "c", "error": f"{type(exc).__name__}: {exc}"[-3000:]}
    line = json.dumps(row)
    print(line, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write(line + "\n")
    return 0 if "error" not in row else 1


if __name__ == "__main__":
    sys.exit(main())
