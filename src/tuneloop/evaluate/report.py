"""``eval/report.html``: one self-contained page that says whether the fine-tune is worth shipping.

Inline CSS, figures embedded as base64 PNGs, no script, no external URL; a Content-Security-Policy meta tag
forbids the page from loading anything, so it opens the same offline, in a CI artefact viewer or in a mail.
Sections: gate verdict, headline table with 95% intervals, paired comparisons, loss curves from
``metrics.jsonl``, the task's own breakdown (confusion matrix / per-field match / lengths), the worst
failures side by side, the regression check and the judge.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

from tuneloop.config import RunConfig
from tuneloop.evaluate import report_plots as plots
from tuneloop.tasks import TaskSpec, get_task

if TYPE_CHECKING:
    from tuneloop.evaluate.run import EvalResult

NAMES = {"base": "base model, zero-shot", "few_shot": "base model, few-shot", "finetuned": "fine-tuned"}
WORST_SHOWN = 15
CELL_CHARS = 1500


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "&ndash;"
    return f"{value:.{digits}f}"


def _p(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "&ndash;"
    return "&lt;0.001" if value < 0.001 else f"{value:.3f}"


def _ci(interval: Sequence[float] | None, digits: int = 3) -> str:
    if not interval:
        return ""
    return f' <span class="ci">[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]</span>'


def _figure(uri: str | None, caption: str) -> str:
    if uri is None:
        return ""
    return f'<figure><img src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool], row_classes: Sequence[str] = (),
           column_classes: Sequence[str] = ()) -> str:
    columns = [" ".join(c for c in ("num" if n else "", extra) if c) for n, extra in zip(numeric, [*column_classes, *[""] * len(numeric)])]
    head = "".join(f'<th class="{css}">{h}</th>' for h, css in zip(header, columns))
    body = []
    for index, row in enumerate(rows):
        css = row_classes[index] if index < len(row_classes) else ""
        cells = "".join(f'<td class="{c_css}">{c}</td>' for c, c_css in zip(row, columns))
        body.append(f'<tr class="{css}">{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _system_name(system: str) -> str:
    return NAMES.get(system, f"{system} (endpoint)")


def _gate(result: EvalResult) -> str:
    if result.gate is None:
        return ""
    verdict = "pass" if result.gate.passed else "fail"
    items = "".join(
        f'<li class="{"ok" if c.passed else "no"}">{_e(c.condition)} &mdash; {_e(c.detail)}</li>' for c in result.gate.checks
    )
    title = "Gate passed" if result.gate.passed else "Gate FAILED: <code>tuneloop eval</code> exits 3"
    return f'<section class="gate {verdict}"><h2>{title}</h2><ul>{items}</ul></section>'


def _paired(comparison: Mapping[str, Any] | None) -> str:
    """One paired test in a headline cell: the fine-tune's lead over this baseline, its interval, p, verdict."""
    if not comparison:
        return "&ndash;"
    css = {"better": "better", "worse": "worse"}.get(comparison["verdict"], "same")
    low, high = comparison["ci95"]
    return (
        f'{comparison["delta"]:+.3f} <span class="ci">[{low:+.3f}, {high:+.3f}]</span><br>'
        f'<span class="{css}">{_e(comparison["verdict"])}</span> <span class="ci">p {_p(comparison["p_value"])}</span>'
    )


def _headline(result: EvalResult) -> str:
    """Systems as columns (fine-tune first), each metric with its 95% interval; below the metrics, the
    paired test of the fine-tune against each baseline column, so one table answers "better, and by how much?"."""
    metrics, headline = result.metrics, [m for m in result.headline if any(m in s for s in result.metrics.values())]
    extra = [m for m in ("invalid_rate", "judge_score") if any(isinstance(s.get(m), (int, float)) for s in metrics.values())]
    systems = ["finetuned", *(s for s in metrics if s != "finetuned")] if "finetuned" in metrics else list(metrics)
    comparisons = metrics.get("finetuned", {}).get("comparisons") or {}
    header = ["", *[_e(_system_name(s)) for s in systems]]
    rows = []
    for name in headline + extra:
        rows.append([_e(name.replace("_", " ")), *[_num(metrics[s].get(name)) + _ci(metrics[s].get("ci95", {}).get(name)) for s in systems]])
    for name in headline:
        if any(name in comparisons.get(s, {}) for s in systems):
            label = f"fine-tuned minus this, {_e(name.replace('_', ' '))} (paired)"
            rows.append([label, *["" if s == "finetuned" else _paired(comparisons.get(s, {}).get(name)) for s in systems]])
    rows.append(["examples", *[str(metrics[s].get("n", "")) for s in systems]])
    table = _table(header, rows, [False, *[True] * len(systems)], column_classes=["", *["ft" if s == "finetuned" else "" for s in systems]])
    if len(systems) == 1:
        note = (
            '<p class="note"><b>No baseline was evaluated</b> (<code>baselines: []</code>): these numbers stand alone, and '
            "nothing here says whether the fine-tune beats the base model or a few-shot prompt.</p>"
        )
    else:
        note = (
            '<p class="note">Bracketed after each number: its bootstrap 95% interval over the test examples. The paired rows '
            "test the fine-tune against that column on the same resamples (difference, its 95% interval, bootstrap p); "
            "a difference is called better or worse only when its interval excludes zero.</p>"
        )
    return "<h2>Headline</h2>" + table + note + _figure(plots.headline_chart(metrics, headline), "headline metrics with 95% intervals")


def _comparisons(result: EvalResult) -> str:
    comparisons = result.metrics.get("finetuned", {}).get("comparisons") or {}
    if not comparisons:
        return ""
    rows = []
    for baseline, table in comparisons.items():
        for metric, c in table.items():
            css = {"better": "better", "worse": "worse"}.get(c["verdict"], "same")
            mcnemar = _p(c.get("mcnemar_p"))
            rows.append([
                _e(_system_name(baseline)), _e(metric.replace("_", " ")), f"{c['delta']:+.3f}",
                f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]", _p(c["p_value"]), mcnemar,
                f'<span class="{css}">{_e(c["verdict"])}</span>',
            ])
    header = ["fine-tuned vs", "metric", "difference", "95% CI", "bootstrap p", "McNemar p", "verdict"]
    note = (
        '<p class="note">Paired bootstrap: every resample scores all systems on the same examples. A difference is '
        "called better or worse only when its 95% interval excludes zero. McNemar's exact test (for per-example "
        "right/wrong metrics) counts only the examples on which the two systems disagree.</p>"
    )
    return "<h2>Is the fine-tune really better?</h2>" + _table(header, rows, [False, False, True, True, True, True, False]) + note


def _training(run_dir: Path) -> str:
    rows = plots.read_loss_log(run_dir / "metrics.jsonl")
    chart = plots.loss_chart(rows)
    if chart is None:
        return '<h2>Training</h2><p class="note">No <code>metrics.jsonl</code> in the run directory.</p>'
    return "<h2>Training</h2>" + _figure(chart, "loss curves from metrics.jsonl")


def _classification(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    labels = len((metrics.get("finetuned", {}).get("confusion") or {}).get("labels") or [])
    # Side by side while the matrices stay legible; one under the other (full width) for many labels.
    parts = ["<h2>Classification details</h2>", '<div class="grid">' if labels <= 16 else "<div>"]
    for system in ("finetuned", "base"):
        if "confusion" in metrics.get(system, {}):
            parts.append(_figure(plots.confusion_chart(metrics[system]["confusion"], _system_name(system)), f"confusion matrix, {_system_name(system)}"))
    parts.append("</div>")
    confusions = _top_confusions(metrics.get("finetuned", {}).get("confusion") or {}, shown=10 if labels <= 16 else 25)
    if confusions:
        parts.append("<h3>Most frequent confusions (fine-tuned)</h3>")
        rows = [[_e(a), _e(b), str(n), _num(share)] for a, b, n, share in confusions]
        parts.append(_table(["expected", "answered", "count", "share of expected"], rows, [False, False, True, True]))
        if labels > 16:
            parts.append(
                f'<p class="note">With {labels - 1} labels the matrices above show patterns only (no per-cell numbers); '
                "this table and the per-label scores below are the numbers to read.</p>"
            )
    per_label = metrics.get("finetuned", {}).get("per_label") or {}
    if per_label:
        systems = [s for s in metrics if metrics[s].get("per_label")]
        header = ["label", "support", *[f"F1 {_e(_system_name(s))}" for s in systems], "precision (ft)", "recall (ft)"]
        rows = [
            [_e(label), str(v["support"]), *[_num(metrics[s]["per_label"][label]["f1"]) for s in systems], _num(v["precision"]), _num(v["recall"])]
            for label, v in sorted(per_label.items(), key=lambda item: item[1]["f1"])
        ]
        table = _table(header, rows, [False, *[True] * (len(header) - 1)])
        parts.append(f"<details><summary>Per-label scores ({len(rows)} labels, weakest first)</summary>{table}</details>")
    return "".join(parts)


def _top_confusions(confusion: Mapping[str, Any], shown: int = 10) -> list[tuple[str, str, int, float]]:
    """Off-diagonal cells, largest first, with their share of the expected label's examples: with dozens of
    labels, the readable summary of the matrix. Ties keep the matrix order, so the table is stable."""
    labels, matrix = confusion.get("labels") or [], confusion.get("matrix") or []
    cells = [
        (labels[i], labels[j], n, n / max(sum(row), 1)) for i, row in enumerate(matrix) for j, n in enumerate(row) if i != j and n
    ]
    return sorted(cells, key=lambda cell: -cell[2])[:shown]


def _json(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    parts = ["<h2>JSON details</h2>", _figure(plots.field_chart(metrics), "exact match per field")]
    rows = []
    for system, values in metrics.items():
        rows.append([
            _e(_system_name(system)), _num(values.get("valid_json_rate")), _num(values.get("schema_compliance_rate")),
            _num(values.get("field_accuracy")), _num(values.get("exact_match")),
        ])
    parts.append(_table(["system", "valid JSON", "schema compliant", "field accuracy", "exact match"], rows, [False, True, True, True, True]))
    errors = metrics.get("finetuned", {}).get("schema_errors") or {}
    if errors:
        parts.append("<h3>Most frequent schema violations (fine-tuned)</h3>")
        parts.append(_table(["violation", "count"], [[_e(k), str(v)] for k, v in errors.items()], [False, True]))
    return "".join(parts)


def _generation(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for system, values in metrics.items():
        lengths = values.get("length_words") or {}
        rows.append([
            _e(_system_name(system)), _num(values.get("rouge2")), _num(lengths.get("mean"), 1), _num(lengths.get("median"), 1),
            _num(lengths.get("p95"), 1), _num(values.get("length_ratio"), 2), str(values.get("empty", "")),
        ])
    reference = next(iter(metrics.values())).get("reference_length_words") or {}
    header = ["system", "ROUGE-2", "mean words", "median", "p95", "length / reference", "empty answers"]
    note = f'<p class="note">Reference answers: mean {_num(reference.get("mean"), 1)} words, median {_num(reference.get("median"), 1)}.</p>'
    return "<h2>Generation details</h2>" + _table(header, rows, [False, True, True, True, True, True, True]) + note


TASK_SECTIONS = {"classification": _classification, "json": _json, "generation": _generation}


def _cell(raw: str, parsed: str, right: bool) -> str:
    text = raw if len(raw) <= CELL_CHARS else raw[:CELL_CHARS] + " ..."
    shown = f'{_e(text)}<span class="parsed">read as: {_e(parsed)}</span>' if parsed != raw.strip() else _e(text)
    return f'<td class="{"right" if right else "wrong"}">{shown}</td>'


def _failures(result: EvalResult, spec: TaskSpec, inputs: Sequence[str], references: Sequence[str],
              outputs: Mapping[str, Sequence[str]], predictions: Mapping[str, Sequence[str]]) -> str:
    task = get_task(result.task)
    if task.example_scores is None or "finetuned" not in outputs:
        return ""
    scores = {s: task.example_scores(predictions[s], references, spec) for s in ("finetuned", "base") if s in predictions}
    ours = scores["finetuned"]
    theirs = scores.get("base", [0.0] * len(ours))
    order = sorted((i for i in range(len(ours)) if ours[i] < 1.0), key=lambda i: (ours[i], -theirs[i], i))[:WORST_SHOWN]
    if not order:
        return "<h2>Worst failures</h2><p class=\"note\">The fine-tune got every test example right.</p>"
    columns = [s for s in ("base", "finetuned") if s in outputs]
    head = "<tr><th>input</th><th>expected</th>" + "".join(f"<th>{_e(_system_name(s))}</th>" for s in columns) + "</tr>"
    rows = []
    for i in order:
        text = inputs[i]
        text = text if len(text) <= CELL_CHARS else text[:CELL_CHARS] + " ..."
        cells = [f"<td>{_e(text)}</td>", f"<td>{_e(references[i])}</td>"]
        cells += [_cell(outputs[s][i], predictions[s][i], scores[s][i] >= 1.0) for s in columns]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = (
        '<p class="note">Fine-tuned answers scored lowest, those the base model got right first. Green: right; red: '
        "wrong. &ldquo;read as&rdquo; is the task's reading of the raw answer.</p>"
    )
    return f'<h2>Worst failures</h2>{note}<table class="cases"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _regression(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """Base vs fine-tune on the general prompts; the fine-tune alone when no base model was evaluated."""
    base, ours = metrics.get("base", {}).get("regression"), metrics.get("finetuned", {}).get("regression")
    if not ours:
        return '<h2>Regression check</h2><p class="note">Off (<code>regression_check: false</code>).</p>'
    columns = [(who, result) for who, result in (("base", base), ("fine-tuned", ours)) if result]
    vs = ours.get("vs_base", {})
    rows = []
    for name, label in (("pass_rate", "general prompts passed"), ("format_bleed_rate", "answers in the task's format")):
        if ours.get(name) is None:
            continue
        c = vs.get(name)
        change = [] if not base else ["&ndash;"] * 3 if c is None else [f"{c['delta']:+.3f}", f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]", _p(c["p_value"])]
        rows.append([label, *[_num(r[name]) + _ci(r.get("ci95", {}).get(name)) for _, r in columns], *change])
    header = ["", *[who for who, _ in columns], *(["change", "95% CI", "p"] if base else [])]
    table = _table(header, rows, [False, *[True] * (len(header) - 1)])
    categories = sorted(set().union(*(r["per_category"] for _, r in columns)))

    def passed(result: Mapping[str, Any], category: str) -> str:
        counts = result["per_category"].get(category, {})
        return f"{counts.get('passed', 0)}/{counts.get('n', 0)}"

    per_category = _table(
        ["passed", *[_e(c) for c in categories]],
        [[who, *[passed(result, c) for c in categories]] for who, result in columns],
        [False, *[True] * len(categories)],
    )
    cases = ""
    if base:
        forgotten = [(b, o) for b, o in zip(base["answers"], ours["answers"]) if (b["passed"] and not o["passed"]) or o["format_bleed"]]
        if forgotten:
            body = "".join(
                f"<tr><td>{_e(b['prompt'])}</td>{_cell(b['answer'], b['answer'], b['passed'])}{_cell(o['answer'], o['answer'], o['passed'] and not o['format_bleed'])}</tr>"
                for b, o in forgotten[:WORST_SHOWN]
            )
            cases = (f'<h3>Forgotten or bled ({len(forgotten)})</h3><table class="cases"><thead><tr><th>general prompt</th>'
                     f"<th>base</th><th>fine-tuned</th></tr></thead><tbody>{body}</tbody></table>")
    else:
        failed = [o for o in ours["answers"] if not o["passed"] or o["format_bleed"]]
        if failed:
            body = "".join(
                f"<tr><td>{_e(o['prompt'])}</td>{_cell(o['answer'], o['answer'], False)}</tr>" for o in failed[:WORST_SHOWN]
            )
            cases = (f'<h3>Failed or bled ({len(failed)})</h3><table class="cases"><thead><tr><th>general prompt</th>'
                     f"<th>fine-tuned</th></tr></thead><tbody>{body}</tbody></table>")
    note = (
        f'<p class="note">{ours["n"]} general-purpose prompts (knowledge, arithmetic, language, instructions, reasoning) '
        "asked without the task's system prompt, each checked by a rule. A drop means forgetting; answers in the task's "
        "format (a bare label, a JSON object) to unrelated prompts mean format bleed."
        + ("" if base else " No base model was evaluated (<code>base</code> is not in <code>baselines</code>), so there is "
           "no before to compare with: forgetting cannot be measured here.")
        + "</p>"
    )
    return "<h2>Regression check</h2>" + note + table + per_category + cases


def _judge(judge: Mapping[str, Any] | None) -> str:
    if not judge:
        return ""
    rows = []
    if judge["mode"] == "pointwise":
        for system, entry in judge.items():
            if isinstance(entry, dict):
                rows.append([_e(_system_name(system)), _num(entry["mean_score"], 2) + _ci(entry.get("ci95"), 2), str(entry["unparsed"])])
        table = _table(["system", "mean score (1-10)", "unparsed verdicts"], rows, [False, True, True])
    else:
        for system, entry in judge.items():
            if isinstance(entry, dict):
                rows.append([_e(_system_name(system)), str(entry["wins"]), str(entry["ties"]), str(entry["losses"]),
                             _num(entry["win_rate"]) + _ci(entry.get("ci95")), _num(entry["position_consistency"])])
        table = _table(["fine-tuned vs", "wins", "ties", "losses", "win rate", "position consistency"], rows, [False, True, True, True, True, True])
    note = f'<p class="note">Judge <code>{_e(judge["model"])}</code>, {judge["mode"]}, {judge["n"]} examples, {judge["requests"]} new requests (the rest from the cache).</p>'
    return "<h2>LLM judge</h2>" + note + table


def write_report(path: Path, result: EvalResult, config: RunConfig, spec: TaskSpec, inputs: Sequence[str], references: Sequence[str],
                 outputs: Mapping[str, Sequence[str]], predictions: Mapping[str, Sequence[str]]) -> Path:
    """The page, from what an evaluation produced: ``inputs`` are the test prompts' last user turns, ``outputs``
    the raw answers and ``predictions`` the task's readings of them, per system (as in ``predictions.jsonl``)."""
    run_dir = Path(config.output_dir)
    record = {}
    if (run_dir / "record.json").is_file():
        record = json.loads((run_dir / "record.json").read_text(encoding="utf-8"))
    base_model = (record.get("base_model") or {}).get("name", config.base_model)
    facts = {
        "task": result.task, "base model": base_model, "adapter": config.adapter, "test set": f"{Path(str(config.test_file)).name} ({len(inputs)} examples)",
        "bootstrap": f"{config.bootstrap_samples} resamples", "evaluated": time.strftime("%Y-%m-%d %H:%M"),
    }
    body = [
        '<div class="facts">' + "".join(f"<span>{_e(k)}: <b>{_e(v)}</b></span>" for k, v in facts.items()) + "</div>",
        _gate(result), _headline(result), _comparisons(result), _training(run_dir),
        TASK_SECTIONS.get(result.task, lambda m: "")(result.metrics),
        _failures(result, spec, inputs, references, outputs, predictions),
        _regression(result.metrics) if config.regression_check or any("regression" in m for m in result.metrics.values()) else "",
        _judge(result.judge),
    ]
    template = Template(resources.files("tuneloop.evaluate").joinpath("report_template.html").read_text(encoding="utf-8"))
    page = template.substitute(
        title=_e(f"tuneloop evaluation: {run_dir.name}"),
        subtitle=_e(f"{run_dir} - fine-tuned vs {', '.join(_system_name(s) for s in result.metrics if s != 'finetuned') or 'no baseline (baselines: [])'}"),
        body="\n".join(part for part in body if part),
        footer=_e(f"Numbers from {run_dir / 'eval' / 'metrics.json'} and {result.predictions_path.name}; generated by tuneloop."),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def render_run_report(run_dir: Path) -> Path:
    """Re-draw ``<run_dir>/eval/report.html`` from the run's files alone: no model, no test set, no GPU.

    Every number the page shows is in the run directory (``eval/metrics.json``, ``eval/predictions.jsonl``,
    ``gate.json``/``judge.json`` when present; the task from ``adapter/tuneloop.json``; the facts from
    ``config.yaml``), so a report can be re-rendered after a run copied off a GPU machine, and a layout for 77
    labels can be tested on a synthetic run directory.
    """
    from tuneloop.config import load_config
    from tuneloop.evaluate.gate import GateCheck, GateResult
    from tuneloop.evaluate.run import EvalResult
    from tuneloop.models.trained import META_FILE, find_artifact

    run_dir = Path(run_dir)
    eval_dir = run_dir / "eval"
    config = load_config(run_dir / "config.yaml", {"output_dir": str(run_dir)})
    meta = json.loads((find_artifact(run_dir) / META_FILE).read_text(encoding="utf-8"))
    spec = TaskSpec.from_dict(meta["task"])
    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    gate = judge = None
    if (eval_dir / "gate.json").is_file():
        checks = json.loads((eval_dir / "gate.json").read_text(encoding="utf-8"))["checks"]
        gate = GateResult(tuple(GateCheck(c["condition"], c["passed"], c["detail"]) for c in checks))
    if (eval_dir / "judge.json").is_file():
        judge = json.loads((eval_dir / "judge.json").read_text(encoding="utf-8"))
    task = get_task(spec.task)
    result = EvalResult(run_dir, metrics, eval_dir / "predictions.jsonl", 0.0, task.name, task.headline, gate, None, judge)
    return write_report(
        eval_dir / "report.html", result, config, spec,
        [r["input"] for r in rows], [r["expected"] for r in rows],
        {s: [r[f"{s}_raw"] for r in rows] for s in metrics}, {s: [r[s] for r in rows] for s in metrics},
    )
