"""Regression check: general-purpose prompts scored before and after fine-tuning.

Fine-tuning a small model on one narrow task can make it forget how to answer anything else
(catastrophic forgetting) or answer everything in the task's format ("billing" to "what is the capital of
France?"; a JSON object to "say hello"): format bleed. tuneloop ships a small prompt set
(``regression_prompts.jsonl``, 40 prompts: knowledge, arithmetic, language, conversation, instructions,
reasoning) whose answers a rule can check. Base and fine-tune answer it without the task's system prompt,
the way a user who reuses the model for something else would ask. The pass rate before vs after, with a
paired bootstrap interval, is the forgetting signal; the share of answers in the task's format is the
bleed signal.

Each prompt line: ``{"id", "category", "prompt", "check": {"type": ..., ...}}`` with check types from
:data:`CHECKS`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tuneloop.data import DataError
from tuneloop.data.types import RowRef
from tuneloop.tasks import Task, TaskSpec
from tuneloop.tasks.base import mean_statistic

SHIPPED = "regression_prompts.jsonl"
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen".split()
)}


@dataclass(frozen=True)
class RegressionPrompt:
    id: str
    category: str
    prompt: str
    check: Mapping[str, Any]


def _contains_any(text: str, check: Mapping[str, Any], prompt: str) -> bool:
    return any(str(v).lower() in text for v in check["values"])


def _count_any(text: str, check: Mapping[str, Any], prompt: str) -> bool:
    return sum(str(v).lower() in text for v in check["values"]) >= int(check.get("min", 1))


def _regex(text: str, check: Mapping[str, Any], prompt: str) -> bool:
    return re.search(check["pattern"], text) is not None


def _numbers(text: str) -> list[float]:
    for word, digit in _NUMBER_WORDS.items():
        text = re.sub(rf"\b{word}\b", digit, text)
    return [float(n.replace(",", ".")) for n in _NUMBER.findall(text)]


def _number(text: str, check: Mapping[str, Any], prompt: str) -> bool:
    """The answer's first number that is not already in the prompt: "2 + 3 = 5" answers 5, while
    "365 * 12 = 312 months" answers 365 (wrong), and echoing the question's numbers answers nothing."""
    given = set(_numbers(prompt.lower()))
    fresh = [n for n in _numbers(text) if n not in given]
    return bool(fresh) and fresh[0] == float(check["value"])


# check type -> (required keys, test on the lower-cased answer given the prompt)
CHECKS: dict[str, tuple[tuple[str, ...], Callable[[str, Mapping[str, Any], str], bool]]] = {
    "contains_any": (("values",), _contains_any),
    "count_any": (("values", "min"), _count_any),
    "regex": (("pattern",), _regex),
    "number": (("value",), _number),
}


def passes(prompt: RegressionPrompt, answer: str) -> bool:
    return CHECKS[prompt.check["type"]][1](answer.strip().lower(), prompt.check, prompt.prompt)


def load_prompts(path: Path | None = None) -> list[RegressionPrompt]:
    """The shipped set, or ``path``; a malformed line is a :class:`DataError` naming file and line."""
    if path is None:
        text = resources.files("tuneloop.evaluate").joinpath(SHIPPED).read_text(encoding="utf-8")
        where = SHIPPED
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        ref = RowRef(where, number)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(ref, f"not valid JSON: {exc.msg}") from None
        for key in ("id", "prompt", "check"):
            if key not in row:
                raise DataError(ref, "missing", field=key)
        check = row["check"]
        if not isinstance(check, dict) or check.get("type") not in CHECKS:
            raise DataError(ref, f"check.type must be one of {', '.join(CHECKS)}", field="check")
        missing = [k for k in CHECKS[check["type"]][0] if k not in check and k != "min"]
        if missing:
            raise DataError(ref, f"a {check['type']} check needs {', '.join(missing)}", field="check")
        if check["type"] == "regex":
            try:
                re.compile(check["pattern"])
            except re.error as exc:
                raise DataError(ref, f"bad pattern: {exc}", field="check.pattern") from None
        prompts.append(RegressionPrompt(str(row["id"]), str(row.get("category", "general")), row["prompt"], check))
    if not prompts:
        raise DataError(where, "no regression prompts")
    return prompts


def score_system(
    prompts: Sequence[RegressionPrompt], answers: Sequence[str], task: Task, spec: TaskSpec
) -> dict[str, Any]:
    """Pass rate overall and per category, format-bleed rate, and every answer (for the report)."""
    passed = [passes(p, a) for p, a in zip(prompts, answers)]
    bleed = [bool(task.looks_like_output and task.looks_like_output(a, spec)) for a in answers]
    categories: dict[str, list[bool]] = {}
    for prompt, ok in zip(prompts, passed):
        categories.setdefault(prompt.category, []).append(ok)
    n = len(prompts)
    return {
        "n": n,
        "passed": sum(passed),
        "pass_rate": sum(passed) / n,
        "format_bleed": sum(bleed),
        "format_bleed_rate": sum(bleed) / n if task.looks_like_output else None,
        "per_category": {c: {"passed": sum(v), "n": len(v)} for c, v in sorted(categories.items())},
        "answers": [
            {"id": p.id, "prompt": p.prompt, "answer": a, "passed": ok, "format_bleed": b}
            for p, a, ok, b in zip(prompts, answers, passed, bleed)
        ],
    }


def statistics(scored: Mapping[str, Any], has_bleed: bool) -> dict[str, Any]:
    """The system's regression scores in resampling form, for intervals and the paired base/fine-tune test."""
    rows = scored["answers"]
    stats = {"pass_rate": mean_statistic([r["passed"] for r in rows])}
    if has_bleed:
        stats["format_bleed_rate"] = mean_statistic([r["format_bleed"] for r in rows])
    return stats
