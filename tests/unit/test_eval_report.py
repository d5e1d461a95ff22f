"""report.html from hand-made results: self-contained, escaped, and every section present."""

from __future__ import annotations

import re

import pytest

from tuneloop.config import validate_config
from tuneloop.evaluate.bootstrap import confidence_report
from tuneloop.evaluate.gate import evaluate_gate
from tuneloop.evaluate.report import write_report
from tuneloop.evaluate.run import EvalResult
from tuneloop.tasks import TaskSpec, get_task

pytestmark = pytest.mark.unit

LABELS = ("billing", "bug_report", "onboarding")
INPUTS = ["refund please", "app crashes", "how do I start <script>alert(1)</script>", "charged twice", "blank page", "invite team"]
EXPECTED = ["billing", "bug_report", "onboarding", "billing", "bug_report", "onboarding"]
RAW = {
    "finetuned": ["billing", "bug_report", "billing", "billing", "bug_report", "onboarding"],
    "base": ["I think billing", "no idea", "onboarding <b>bold</b>", "billing", "x", "y"],
}


def make(tmp_path, task_name="classification"):
    config = validate_config({
        "train_file": str(tmp_path / "train.csv"), "test_file": str(tmp_path / "test.csv"), "output_dir": str(tmp_path / "run"),
        "gate": {"min_metric": {"accuracy": 0.9}},
    })
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"step": 2, "epoch": 1, "val_loss": 1.5}\n')
    spec = TaskSpec("classification", None, LABELS)
    task = get_task(task_name)
    predictions = {s: [task.parse_answer(o, spec) for o in outs] for s, outs in RAW.items()}
    metrics = {s: task.score(p, EXPECTED, spec) for s, p in predictions.items()}
    ci95, comparisons = confidence_report({s: task.statistics(p, EXPECTED, spec) for s, p in predictions.items()}, "finetuned", 200, 0)
    for s in metrics:
        metrics[s]["ci95"] = ci95[s]
    metrics["finetuned"]["comparisons"] = comparisons
    gate = evaluate_gate(config.gate, metrics)
    predictions_path = tmp_path / "run" / "eval" / "predictions.jsonl"
    result = EvalResult(tmp_path / "run", metrics, predictions_path, 1.0, task.name, task.headline, gate)
    path = write_report(tmp_path / "run" / "eval" / "report.html", result, config, spec, INPUTS, EXPECTED, RAW, predictions)
    return path.read_text(encoding="utf-8"), metrics


def test_report_is_self_contained_and_escaped(tmp_path):
    page, _ = make(tmp_path)
    sources = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # a failing example's input, shown as text
    assert "&lt;b&gt;bold&lt;/b&gt;" in page  # a model's raw answer is shown as text, never as markup
    assert "default-src 'none'" in page  # the page may not load anything, even if a URL slipped in
    assert "@import" not in page and "url(" not in page


def test_report_sections_and_numbers(tmp_path):
    page, metrics = make(tmp_path)
    for section in ("Gate FAILED", "Headline", "Is the fine-tune really better?", "Training", "Classification details",
                    "Most frequent confusions", "Worst failures", "Regression check"):
        assert section in page, section
    accuracy = metrics["finetuned"]["accuracy"]
    low, high = metrics["finetuned"]["ci95"]["accuracy"]
    assert f"{accuracy:.3f} <span class=\"ci\">[{low:.3f}, {high:.3f}]</span>" in page
    # worst failure first: the example the fine-tune got wrong and the base model got right
    failures = page[page.index("Worst failures"):]
    assert failures.index("how do I start") < failures.index("onboarding</td>")
    assert page.count("data:image/png;base64,") >= 4  # headline, loss curve, two confusion matrices
