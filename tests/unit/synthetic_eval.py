"""An evaluated run directory without a model: answers made up per system, scored by tuneloop's own task code.

``metrics.json`` is built exactly as ``evaluate.run`` builds it (task score, paired bootstrap, the
fine-tune's comparisons and baseline list) and ``predictions.jsonl`` has the same columns, so the report can be
rendered and the independent verifier (``bench/verify_eval.py``) run on a realistic run: 77 labels, thousands
of rows, in a second.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from tuneloop.config import dump_config, validate_config
from tuneloop.evaluate.bootstrap import confidence_report
from tuneloop.tasks import TaskSpec, get_task

ROOT = Path(__file__).resolve().parents[2]


def load_verifier() -> ModuleType:
    """``bench/verify_eval.py`` as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("verify_eval", ROOT / "bench" / "verify_eval.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def write_run(
    run_dir: Path,
    spec: TaskSpec,
    inputs: Sequence[str],
    references: Sequence[str],
    raw: Mapping[str, Sequence[str]],
    *,
    bootstrap_samples: int = 200,
    config: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write config.yaml, adapter/tuneloop.json, metrics.jsonl and eval/{metrics.json,predictions.jsonl}."""
    task = get_task(spec.task)
    resolved = validate_config({
        "task": spec.task, "train_file": str(run_dir / "train.csv"), "test_file": str(run_dir / "test.csv"),
        "output_dir": str(run_dir), "bootstrap_samples": bootstrap_samples, "regression_check": False, **(config or {}),
    })
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "eval").mkdir()
    (run_dir / "config.yaml").write_text(dump_config(resolved), encoding="utf-8")
    (run_dir / "adapter" / "tuneloop.json").write_text(json.dumps({"task": spec.as_dict()}), encoding="utf-8")
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 4.0 / s}) + "\n" for s in range(1, 40)), encoding="utf-8"
    )
    predictions = {s: [task.parse_answer(o, spec) for o in outs] for s, outs in raw.items()}
    metrics = {s: task.score(p, references, spec) for s, p in predictions.items()}
    statistics = {s: task.statistics(p, references, spec) for s, p in predictions.items()}
    ci95, comparisons = confidence_report(statistics, "finetuned", bootstrap_samples, 0)
    for system, values in metrics.items():
        values["ci95"] = ci95.get(system, {})
    metrics["finetuned"]["comparisons"] = comparisons
    metrics["finetuned"]["baselines"] = [s for s in metrics if s != "finetuned"]
    (run_dir / "eval" / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    with (run_dir / "eval" / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for i, text in enumerate(inputs):
            row: dict[str, Any] = {"source": f"test.csv:{i + 2}", "input": text, "expected": references[i]}
            for system in raw:
                row[system] = predictions[system][i]
                row[f"{system}_raw"] = raw[system][i]
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return metrics
