"""The report's figures, drawn with matplotlib's object API (no pyplot: no global figure state) as PNG data URIs.

Each function returns ``data:image/png;base64,...`` or ``None`` when there is nothing to draw, so the page
embeds its pictures and loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SYSTEM_COLORS = {"base": "#9aa5b1", "few_shot": "#e0a458", "finetuned": "#2f6fdf"}
OTHER_COLORS = ("#7b61c4", "#3a9d5d", "#c4566b", "#4aa3a2")


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", dpi=110)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def color(system: str, index: int) -> str:
    return SYSTEM_COLORS.get(system, OTHER_COLORS[index % len(OTHER_COLORS)])


def headline_chart(metrics: Mapping[str, Mapping[str, Any]], headline: Sequence[str]) -> str | None:
    """Grouped bars per headline metric, one bar per system, whiskers at the bootstrap 95% interval."""
    names = [m for m in headline if any(isinstance(s.get(m), (int, float)) for s in metrics.values())]
    if not names:
        return None
    figure = _figure(1.6 + 1.5 * len(names) * max(1, len(metrics)) / 3, 3.2)
    axes = figure.subplots()
    width = 0.8 / len(metrics)
    for index, (system, values) in enumerate(metrics.items()):
        xs, ys, low, high = [], [], [], []
        for position, name in enumerate(names):
            value = values.get(name)
            if not isinstance(value, (int, float)):
                continue
            interval = values.get("ci95", {}).get(name) or [value, value]
            xs.append(position + (index - (len(metrics) - 1) / 2) * width)
            ys.append(value)
            low.append(max(value - interval[0], 0))
            high.append(max(interval[1] - value, 0))
        axes.bar(xs, ys, width * 0.95, yerr=[low, high], capsize=3, label=system, color=color(system, index))
    axes.set_xticks(range(len(names)), [n.replace("_", " ") for n in names])
    axes.set_ylim(0, 1.05 if all(_is_rate(metrics, n) for n in names) else None)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    return _png(figure)


def _is_rate(metrics: Mapping[str, Mapping[str, Any]], name: str) -> bool:
    return all(not isinstance(m.get(name), (int, float)) or 0 <= m[name] <= 1 for m in metrics.values())


def read_loss_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash; the rest of the curve is still worth drawing
    return rows


def loss_chart(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Training loss per logged step and validation loss per evaluation, on one step axis."""
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    validation = [(r["step"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))]
    if not train and not validation:
        return None
    figure = _figure(6.4, 3.0)
    axes = figure.subplots()
    if train:
        axes.plot(*zip(*train), label="train loss", color="#2f6fdf", linewidth=1.4)
    if validation:
        axes.plot(*zip(*validation), "o-", label="validation loss", color="#d9534f", linewidth=1.2, markersize=4)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss per trained token")
    if train and max(v for _, v in train) > 20 * max(min(v for _, v in train), 1e-6):
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend(frameon=False)
    return _png(figure)


def confusion_chart(confusion: Mapping[str, Any], title: str) -> str | None:
    """Row-normalised confusion matrix (rows: expected, columns: predicted, last column: invalid answers)."""
    import numpy as np

    labels = list(confusion.get("labels") or [])
    matrix = np.asarray(confusion.get("matrix") or [], dtype=float)
    if not labels or matrix.size == 0:
        return None
    size = len(labels)
    rows = matrix[:-1] if matrix.shape[0] == size and not matrix[-1].any() else matrix
    row_labels = labels[: rows.shape[0]]
    shares = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1)
    from matplotlib.colors import Normalize, PowerNorm

    if size <= 30:
        side, font = max(4.0, 0.2 * size + 2.0), 8.0 if size <= 20 else 6.5
    else:
        # Many labels (BANKING77: 77 + invalid): sized for the page's 1116 px at 110 dpi, so the browser shows it
        # about unscaled, one row ~10 px and 5-point label names still legible; cells carry colour only.
        side, font = 9.0, 5.0
    # Without numbers in the cells, a 5% confusion on a linear scale is all but white next to a 90% diagonal;
    # a square-root scale makes it visible (the colour bar says so).
    norm = Normalize(0, 1) if size <= 15 else PowerNorm(gamma=0.5, vmin=0, vmax=1)
    figure = _figure(side + 1.2, side * rows.shape[0] / size + 0.6)
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", norm=norm, aspect="auto")
    axes.set_xticks(range(size), labels, rotation=90, fontsize=font)
    axes.set_yticks(range(len(row_labels)), row_labels, fontsize=font)
    axes.set_xlabel("predicted")
    axes.set_ylabel("expected")
    axes.set_title(title, fontsize=10)
    if size <= 15:
        for i in range(rows.shape[0]):
            for j in range(size):
                if rows[i, j]:
                    axes.text(j, i, int(rows[i, j]), ha="center", va="center", fontsize=7,
                              color="white" if shares[i, j] > 0.5 else "black")
    figure.colorbar(image, ax=axes, shrink=0.6, label="share of the row" + ("" if size <= 15 else " (square-root scale)"))
    return _png(figure)


def field_chart(metrics: Mapping[str, Mapping[str, Any]]) -> str | None:
    """JSON task: exact match per field, one bar per system."""
    fields = list(next((m.get("per_field") for m in metrics.values() if m.get("per_field")), {}) or {})
    if not fields:
        return None
    figure = _figure(1.5 + 1.2 * len(fields), 3.0)
    axes = figure.subplots()
    width = 0.8 / len(metrics)
    for index, (system, values) in enumerate(metrics.items()):
        per_field = values.get("per_field") or {}
        xs = [p + (index - (len(metrics) - 1) / 2) * width for p in range(len(fields))]
        ys = [per_field.get(f, {}).get("exact_match", 0.0) for f in fields]
        axes.bar(xs, ys, width * 0.95, label=system, color=color(system, index))
    axes.set_xticks(range(len(fields)), fields)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("exact match")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    return _png(figure)
