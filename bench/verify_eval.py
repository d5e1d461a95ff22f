"""Recompute every headline number of ``tuneloop eval`` from ``predictions.jsonl`` and compare with ``metrics.json``.

    python bench/verify_eval.py RUN_DIR [--schema SCHEMA.json] [--tolerance 1e-9]

Prints one JSON verdict and exits 0 when every number agrees, 1 on any mismatch, 2 when the run directory
cannot be read.

Why a script beside tuneloop and not ``tuneloop eval --verify``: a check that imports the code it checks
shares that code's bugs. A wrong label list, an answer parsed one way and scored another, a misused
scikit-learn argument would be reproduced on both sides and agree with itself. This file imports nothing
from tuneloop; it reads the run directory the way a user would (``eval/metrics.json``,
``eval/predictions.jsonl``, the task and labels in ``adapter/tuneloop.json``, the JSON Schema named in
``config.yaml``) and recomputes every metric from the definitions in docs/evaluation.md with plain Python
(counts, formulas, an LCS table) and ``jsonschema`` for schema compliance. It runs wherever the run
directory is copied, with no model and no GPU.

What it checks, per system (fine-tune, each baseline, each endpoint):
- classification: n, accuracy, macro/weighted F1, per-label precision/recall/F1/support, the confusion
  matrix cell by cell, invalid count and rate; every parsed answer is a label or ``<invalid>``;
- json: n, valid-JSON count and rate, schema compliance (with the schema), per-field exact match and
  support, field accuracy, exact match; a parsed answer is ``<invalid>`` exactly when the raw reply is not
  one JSON value, else the same value;
- generation: n, exact match, ROUGE-1/2/L, empty answers, length statistics, length ratio;
- the fine-tune's paired comparisons: each difference equals the recomputed difference, McNemar's exact
  p-value, verdicts consistent with their intervals; the regression check's rates against its answers.
Bootstrap intervals are random by nature and are not recomputed; an estimate outside its own interval is a
warning, not a mismatch.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

INVALID = "<invalid>"  # the file format's marker of an answer that could not be read
MAX_LCS_TOKENS = 2000  # documented: ROUGE-L compares the first 2000 word tokens
WORD = re.compile(r"\w+", re.UNICODE)


class Unreadable(Exception):
    """The run directory lacks a file the check needs, or a file is not what tuneloop writes."""


# --- reading the run directory -------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Unreadable(f"{path}: not found") from None
    except json.JSONDecodeError as exc:
        raise Unreadable(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None


def read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise Unreadable(f"{path}: not found") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise Unreadable(f"{path}:{number}: not JSON ({exc.msg})") from None
    return rows


def read_task(run_dir: Path) -> dict[str, Any]:
    for folder in ("adapter", "model"):
        meta = run_dir / folder / "tuneloop.json"
        if meta.is_file():
            return read_json(meta)["task"]
    raise Unreadable(f"{run_dir}: no adapter/tuneloop.json or model/tuneloop.json (the task and its labels)")


def read_schema(run_dir: Path, explicit: Path | None) -> Any:
    """The JSON Schema: ``--schema``, else the ``json_schema`` path in the run's ``config.yaml``."""
    path = explicit
    if path is None and (run_dir / "config.yaml").is_file():
        import yaml

        named = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}).get("json_schema")
        path = Path(named) if named else None
    return None if path is None else read_json(path)


# --- definitions, written out ----------------------------------------------------------------------------------


def json_same(a: Any, b: Any) -> bool:
    """JSON value equality: ``true`` is not ``1``, objects compare key by key, arrays in order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def json_value(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False, None


Scored = tuple[dict[str, Any], dict[str, list[float]]]  # (metrics, per-example values of the headline metrics)


def classification(predicted: list[str], expected: list[str], labels: list[str]) -> Scored:
    n = len(expected)
    columns = [*labels, INVALID]
    where = {label: i for i, label in enumerate(columns)}
    matrix = [[0] * len(columns) for _ in columns]
    for p, e in zip(predicted, expected):
        matrix[where[e]][where[p]] += 1
    per_label = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        answered = sum(row[i] for row in matrix)
        support = sum(matrix[i])
        precision = tp / answered if answered else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * tp / (answered + support) if answered + support else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    total_support = sum(v["support"] for v in per_label.values())
    invalid = sum(p == INVALID for p in predicted)
    right = [float(p == e) for p, e in zip(predicted, expected)]
    return {
        "n": n,
        "accuracy": sum(right) / n,
        "macro_f1": sum(v["f1"] for v in per_label.values()) / len(labels),
        "weighted_f1": sum(v["f1"] * v["support"] for v in per_label.values()) / total_support if total_support else 0.0,
        "invalid": invalid,
        "invalid_rate": invalid / n,
        "per_label": per_label,
        "confusion": {"labels": columns, "matrix": matrix},
    }, {"accuracy": right}


def json_task(predicted: list[str], expected: list[str], schema: Any) -> Scored:
    n = len(expected)
    validator = None
    if schema is not None:
        from jsonschema.validators import validator_for

        validator = validator_for(schema)(schema)
    examples: dict[str, list[float]] = {"valid_json_rate": [], "schema_compliance_rate": [], "field_accuracy": [], "exact_match": []}
    field_hits: Counter[str] = Counter()
    field_support: Counter[str] = Counter()
    for p, e in zip(predicted, expected):
        ok, value = (False, None) if p == INVALID else json_value(p)
        reference = json.loads(e)
        same = ok and json_same(value, reference)
        keys = list(reference) if isinstance(reference, dict) else []
        hits = [isinstance(value, dict) and k in value and json_same(value[k], reference[k]) for k in keys]
        for k, hit in zip(keys, hits):
            field_support[k] += 1
            field_hits[k] += hit
        examples["valid_json_rate"].append(float(ok))
        examples["schema_compliance_rate"].append(float(ok and validator is not None and validator.is_valid(value)))
        examples["field_accuracy"].append(sum(hits) / len(hits) if hits else float(same))
        examples["exact_match"].append(float(same))
    if validator is None:
        del examples["schema_compliance_rate"]
    valid = int(sum(examples["valid_json_rate"]))
    return {
        "n": n,
        "valid_json": valid,
        "valid_json_rate": valid / n,
        "invalid": n - valid,
        "schema_compliance_rate": sum(examples["schema_compliance_rate"]) / n if validator is not None else None,
        "field_accuracy": sum(examples["field_accuracy"]) / n,
        "exact_match": sum(examples["exact_match"]) / n,
        "per_field": {k: {"exact_match": field_hits[k] / field_support[k], "support": field_support[k]} for k in field_support},
    }, examples


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def f_measure(overlap: int, predicted: int, expected: int) -> float:
    if not overlap or not predicted or not expected:
        return 0.0
    return 2 * overlap / (predicted + expected)  # = 2PR/(P+R) with P = overlap/predicted, R = overlap/expected


def rouge_n(p: list[str], r: list[str], n: int) -> float:
    a, b = (Counter(zip(*(tokens[i:] for i in range(n)))) for tokens in (p, r))
    return f_measure(sum(min(count, b[g]) for g, count in a.items()), sum(a.values()), sum(b.values()))


def lcs(a: list[str], b: list[str]) -> int:
    """Longest common subsequence, full table (memory is fine at 2000 x 2000 of small ints per pair)."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def lengths(counts: list[int]) -> dict[str, float]:
    ordered = sorted(counts)
    return {
        "mean": sum(ordered) / len(ordered),
        "median": float(statistics.median(ordered)),
        "p95": float(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]),
        "max": float(ordered[-1]),
    }


def generation(predicted: list[str], expected: list[str]) -> Scored:
    n = len(expected)
    tokens = [(words(p), words(e)) for p, e in zip(predicted, expected)]
    predicted_words, expected_words = [len(p) for p, _ in tokens], [len(e) for _, e in tokens]
    cut = [(p[:MAX_LCS_TOKENS], e[:MAX_LCS_TOKENS]) for p, e in tokens]
    examples = {
        "exact_match": [float(" ".join(p.split()) == " ".join(e.split())) for p, e in zip(predicted, expected)],
        "rouge1": [rouge_n(p, e, 1) for p, e in tokens],
        "rougeL": [f_measure(lcs(p, e), len(p), len(e)) for p, e in cut],
    }
    return {
        "n": n,
        "exact_match": sum(examples["exact_match"]) / n,
        "rouge1": sum(examples["rouge1"]) / n,
        "rouge2": sum(rouge_n(p, e, 2) for p, e in tokens) / n,
        "rougeL": sum(examples["rougeL"]) / n,
        "empty": sum(not p.strip() for p in predicted),
        "length_words": lengths(predicted_words),
        "reference_length_words": lengths(expected_words),
        "length_ratio": sum(predicted_words) / max(sum(expected_words), 1),
    }, examples


def mcnemar(a: list[float], b: list[float]) -> float:
    """Exact two-sided McNemar: a binomial(k, 1/2) test on the k examples where exactly one system is right."""
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    k = only_a + only_b
    if k == 0:
        return 1.0
    tail = sum(math.comb(k, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**k)


# --- comparing -------------------------------------------------------------------------------------------------


class Verdict:
    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self.checked = 0
        self.mismatches: list[dict[str, Any]] = []
        self.warnings: list[str] = []

    def compare(self, where: str, reported: Any, recomputed: Any) -> None:
        """Leaf by leaf: numbers within tolerance, everything else equal; a missing key is a mismatch."""
        if isinstance(recomputed, dict):
            if not isinstance(reported, dict):
                self.fail(where, reported, "an object")
                return
            for key, value in recomputed.items():
                self.compare(f"{where}.{key}", reported.get(key, "<missing>"), value)
            return
        if isinstance(recomputed, list) and recomputed and isinstance(recomputed[0], list):
            if not isinstance(reported, list) or len(reported) != len(recomputed):
                self.fail(where, "a different shape", f"{len(recomputed)} rows")
                return
            for i, (a, b) in enumerate(zip(reported, recomputed)):
                self.compare(f"{where}[{i}]", a, b)
            return
        self.checked += len(recomputed) if isinstance(recomputed, list) else 1  # a matrix row: one number per cell
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (reported, recomputed))
        if numbers:
            if abs(reported - recomputed) > self.tolerance * max(1.0, abs(recomputed)):
                self.fail(where, reported, recomputed)
        elif reported != recomputed:
            self.fail(where, reported, recomputed)

    def fail(self, where: str, reported: Any, recomputed: Any) -> None:
        self.mismatches.append({"where": where, "metrics_json": reported, "recomputed": recomputed})

    def require(self, where: str, condition: bool, detail: str) -> None:
        self.checked += 1
        if not condition:
            self.mismatches.append({"where": where, "problem": detail})


def check_parsing(verdict: Verdict, task: str, system: str, rows: list[dict[str, Any]], labels: list[str]) -> None:
    """The parsed answer must be a reading of the raw one that the task's definition allows."""
    bad: list[int] = []
    for index, row in enumerate(rows):
        parsed, raw = row[system], row.get(f"{system}_raw", "")
        if task == "classification":
            ok = parsed in labels or parsed == INVALID
            ok = ok and (raw.strip() not in labels or parsed == raw.strip())
        elif task == "json":
            readable, value = json_value(raw.strip())
            # the same value: compared as sorted dumps, which tell true from 1 and keep NaN equal to itself
            ok = (parsed == INVALID) if not readable else (
                parsed != INVALID and json.dumps(json.loads(parsed), sort_keys=True) == json.dumps(value, sort_keys=True)
            )
        else:
            ok = parsed == raw.strip()
        if not ok:
            bad.append(index)
    verdict.require(f"{system}.parsing", not bad, f"{len(bad)} parsed answers disagree with their raw text, rows {bad[:10]}")


def recompute(task: str, predicted: list[str], expected: list[str], labels: list[str], schema: Any) -> Scored:
    if task == "classification":
        return classification(predicted, expected, labels)
    if task == "json":
        return json_task(predicted, expected, schema)
    if task == "generation":
        return generation(predicted, expected)
    raise Unreadable(f"unknown task {task!r}")


HEADLINE = {
    "classification": ("accuracy", "macro_f1"),
    "json": ("valid_json_rate", "schema_compliance_rate", "field_accuracy", "exact_match"),
    "generation": ("exact_match", "rouge1", "rougeL"),
}


def check_comparisons(verdict: Verdict, metrics: dict[str, Any], recomputed: dict[str, Scored]) -> None:
    """Each paired comparison of the fine-tune: the difference, McNemar's p where the metric is 0/1 per example
    for both systems (and only there), and a verdict that follows from the interval."""
    ours = metrics["finetuned"]
    if "baselines" in ours:
        verdict.compare("finetuned.baselines", sorted(ours["baselines"]), sorted(s for s in metrics if s != "finetuned"))
    for baseline, table in (ours.get("comparisons") or {}).items():
        verdict.require(f"finetuned.comparisons.{baseline}", baseline in recomputed, "a comparison with a system not evaluated")
        if baseline not in recomputed:
            continue
        for metric, c in table.items():
            where = f"finetuned.comparisons.{baseline}.{metric}"
            (a, a_examples), (b, b_examples) = recomputed["finetuned"], recomputed[baseline]
            if isinstance(a.get(metric), (int, float)) and isinstance(b.get(metric), (int, float)):
                verdict.compare(f"{where}.delta", c.get("delta"), a[metric] - b[metric])
            low, high = c["ci95"]
            called = "better" if low > 0 else "worse" if high < 0 else "no significant difference"
            verdict.compare(f"{where}.verdict", c.get("verdict"), called)
            verdict.compare(f"{where}.significant", c.get("significant"), called != "no significant difference")
            verdict.require(f"{where}.p_value", 0.0 < c["p_value"] <= 1.0, f"p-value {c['p_value']} outside (0, 1]")
            ours_right, theirs_right = a_examples.get(metric), b_examples.get(metric)
            binary = ours_right is not None and theirs_right is not None and set(ours_right) | set(theirs_right) <= {0.0, 1.0}
            if binary:
                verdict.compare(f"{where}.mcnemar_p", c.get("mcnemar_p", "<missing>"), mcnemar(ours_right, theirs_right))
            else:
                verdict.require(f"{where}.mcnemar_p", "mcnemar_p" not in c, "McNemar's test on a metric that is not 0/1 per example")


def check_intervals(verdict: Verdict, system: str, values: dict[str, Any]) -> None:
    for metric, interval in (values.get("ci95") or {}).items():
        low, high = interval
        verdict.require(f"{system}.ci95.{metric}", low <= high, f"interval [{low}, {high}] is upside down")
        value = values.get(metric)
        if isinstance(value, (int, float)) and not low - 1e-12 <= value <= high + 1e-12:
            verdict.warnings.append(f"{system}.{metric} = {value:.4f} lies outside its bootstrap interval [{low:.4f}, {high:.4f}]")


def check_regression(verdict: Verdict, metrics: dict[str, Any]) -> None:
    """The regression check's rates against its own per-prompt answers, and the base -> fine-tune change."""
    rates = {}
    for system, values in metrics.items():
        regression = values.get("regression")
        if not regression:
            continue
        answers = regression["answers"]
        n = len(answers)
        rates[system] = {"pass_rate": sum(a["passed"] for a in answers) / n, "format_bleed_rate": sum(a["format_bleed"] for a in answers) / n}
        verdict.compare(f"{system}.regression.n", regression["n"], n)
        verdict.compare(f"{system}.regression.pass_rate", regression["pass_rate"], rates[system]["pass_rate"])
        if regression.get("format_bleed_rate") is not None:
            verdict.compare(f"{system}.regression.format_bleed_rate", regression["format_bleed_rate"], rates[system]["format_bleed_rate"])
    vs_base = (metrics.get("finetuned", {}).get("regression") or {}).get("vs_base") or {}
    for metric, c in vs_base.items():
        if "base" in rates and "finetuned" in rates:
            verdict.compare(f"finetuned.regression.vs_base.{metric}.delta", c["delta"], rates["finetuned"][metric] - rates["base"][metric])


def verify(run_dir: Path, schema_path: Path | None = None, tolerance: float = 1e-9) -> dict[str, Any]:
    metrics = read_json(run_dir / "eval" / "metrics.json")
    rows = read_rows(run_dir / "eval" / "predictions.jsonl")
    spec = read_task(run_dir)
    task, labels = spec["task"], list(spec.get("labels") or [])
    schema = read_schema(run_dir, schema_path) if task == "json" else None
    if not rows:
        raise Unreadable(f"{run_dir / 'eval' / 'predictions.jsonl'}: no rows")
    verdict = Verdict(tolerance)
    verdict.require("systems", "finetuned" in metrics, "metrics.json has no finetuned entry")
    expected = [r["expected"] for r in rows]
    recomputed: dict[str, Scored] = {}
    for system, values in metrics.items():
        missing = [i for i, r in enumerate(rows) if system not in r]
        verdict.require(f"{system}.predictions", not missing, f"{len(missing)} rows of predictions.jsonl lack this system")
        if missing:
            continue
        check_parsing(verdict, task, system, rows, labels)
        recomputed[system] = recompute(task, [r[system] for r in rows], expected, labels, schema)
        verdict.compare(system, values, recomputed[system][0])
        check_intervals(verdict, system, values)
    if task == "json" and schema is None and any(v.get("schema_compliance_rate") is not None for v in metrics.values()):
        verdict.warnings.append("metrics.json has schema compliance but no schema was found: pass --schema")
    if "finetuned" in recomputed:
        check_comparisons(verdict, metrics, recomputed)
    check_regression(verdict, metrics)
    headline = {s: {m: values[m] for m in HEADLINE.get(task, ()) if m in values} for s, (values, _) in recomputed.items()}
    return {
        "ok": not verdict.mismatches,
        "run_dir": str(run_dir),
        "task": task,
        "n": len(rows),
        "systems": list(metrics),
        "recomputed_headline": headline,
        "numbers_checked": verdict.checked,
        "mismatches": verdict.mismatches,
        "warnings": verdict.warnings,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="run directory with eval/metrics.json and eval/predictions.jsonl")
    parser.add_argument("--schema", type=Path, help="JSON Schema of a json task (default: json_schema in config.yaml)")
    parser.add_argument("--tolerance", type=float, default=1e-9, help="relative tolerance for numbers (default 1e-9)")
    args = parser.parse_args(argv)
    try:
        result = verify(args.run_dir, args.schema, args.tolerance)
    except (Unreadable, KeyError, ValueError) as exc:
        print(json.dumps({"ok": False, "run_dir": str(args.run_dir), "error": f"{type(exc).__name__}: {exc}"}))
        return 2
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
