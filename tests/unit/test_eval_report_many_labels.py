"""report.html for a BANKING77-sized classification (77 labels, 3,080 test rows), rendered from run files alone."""

from __future__ import annotations

import base64
import json
import random
import re
import struct

import pytest

from tests.unit.synthetic_eval import load_verifier, write_run
from tuneloop.evaluate.report import render_run_report
from tuneloop.tasks import TaskSpec

pytestmark = pytest.mark.unit

SUFFIXES = ("card", "card_payment_fee_charged", "wrong_exchange_rate_for_cash_withdrawal", "pin_blocked",
            "transfer_not_received_by_recipient", "top_up_failed", "refund_not_showing_up")
LABELS = tuple(f"intent_{i:02d}_{SUFFIXES[i % len(SUFFIXES)]}" for i in range(77))
PER_LABEL = 40


def synthetic_banking(seed: int = 0):
    """Fine-tune ~92% right with errors into the next label (8 of label 0's, the largest confusion), base almost
    always unreadable prose, few-shot a little better: the shape of the real BANKING77 evaluation."""
    rng = random.Random(seed)
    expected = [label for label in LABELS for _ in range(PER_LABEL)]
    finetuned, base, few_shot = [], [], []
    for index, label in enumerate(expected):
        i, k = LABELS.index(label), index % PER_LABEL
        wrong = 8 if i == 0 else 3
        finetuned.append(LABELS[(i + 1) % 77] if k < wrong else "I am not sure" if k == wrong and i % 9 == 0 else label)
        base.append(label if rng.random() < 0.02 else "It sounds like a question about your account.")
        few_shot.append(label if rng.random() < 0.05 else rng.choice(LABELS) if rng.random() < 0.05 else "Hello! How can I help?")
    inputs = [f"query {n} about {label.split('_', 2)[2].replace('_', ' ')}" for n, label in enumerate(expected)]
    return inputs, expected, {"finetuned": finetuned, "base": base, "few_shot": few_shot}


def png_size(uri: str) -> tuple[int, int]:
    data = base64.b64decode(uri.split(",", 1)[1])
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def banking_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("banking77") / "run"
    inputs, expected, raw = synthetic_banking()
    metrics = write_run(run_dir, TaskSpec("classification", None, LABELS), inputs, expected, raw)
    page = render_run_report(run_dir).read_text(encoding="utf-8")
    return run_dir, metrics, page


def section(page: str, title: str) -> str:
    start = page.index(f"<h2>{title}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start:end if end > 0 else None]


def test_headline_has_three_system_columns_with_intervals_and_paired_tests(banking_run):
    _, metrics, page = banking_run
    headline = section(page, "Headline")
    header = re.search(r"<thead>(.*?)</thead>", headline).group(1)
    assert [h for h in re.findall(r"<th[^>]*>(.*?)</th>", header) if h] == ["fine-tuned", "base model, zero-shot", "base model, few-shot"]
    for system in ("finetuned", "base", "few_shot"):
        for metric in ("accuracy", "macro_f1"):
            low, high = metrics[system]["ci95"][metric]
            assert f'{metrics[system][metric]:.3f} <span class="ci">[{low:.3f}, {high:.3f}]</span>' in headline, (system, metric)
    for metric in ("accuracy", "macro f1"):
        row = re.search(rf"<tr[^>]*><td[^>]*>fine-tuned minus this, {metric} \(paired\)</td>(.*?)</tr>", headline).group(1)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert cells[0] == ""  # the fine-tune's own column
        assert all('class="better">better</span>' in cell and re.search(r"p (&lt;0\.001|0\.\d{3})", cell) for cell in cells[1:])
    assert "No baseline was evaluated" not in page


def test_confusions_are_readable_with_77_labels(banking_run):
    page = banking_run[2]
    details = section(page, "Classification details")
    confusions = details[details.index("Most frequent confusions"):]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", confusions.split("</table>")[0])[1:]
    assert len(rows) == 25
    first = re.findall(r"<td[^>]*>(.*?)</td>", rows[0])
    assert first == [LABELS[0], LABELS[1], "8", "0.200"]
    assert "Per-label scores (77 labels, weakest first)" in details
    images = re.findall(r'<img src="(data:image/png;base64,[^"]+)" alt="confusion matrix, ([^"]+)"', details)
    assert [name for _, name in images] == ["fine-tuned", "base model, zero-shot"]
    for uri, _ in images:
        width, height = png_size(uri)
        assert 900 <= width <= 1400 and 900 <= height <= 1500, (width, height)  # shown near 1:1 in the 1116 px page


def test_the_synthetic_run_verifies_independently(banking_run, capsys):
    run_dir, _, _ = banking_run
    verifier = load_verifier()
    assert verifier.main([str(run_dir)]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["ok"] and verdict["n"] == 77 * PER_LABEL and verdict["systems"] == ["finetuned", "base", "few_shot"]
    assert verdict["numbers_checked"] > 3 * 78 * 78  # every confusion cell of every system, and more
