"""LLM-as-judge through any OpenAI-compatible endpoint, pointwise or pairwise, with an on-disk cache.

* **Pointwise**: each system's answer gets a 1-10 score against the rubric (the reference answer shown
  as a guide). The mean score gets a bootstrap interval like every other metric.
* **Pairwise**: the fine-tune against a baseline. Judges prefer whichever answer comes first (or second)
  more often than chance, so every pair is judged twice, positions swapped; the fine-tune wins an example
  only when both orders prefer it, loses only when both prefer the baseline, and anything else is a tie.
  The share of examples on which the two orders agree is reported as the judge's position consistency.

Verdicts are cached as one JSON file per request under ``cache_dir``, keyed by a SHA-256 of (judge model,
rubric, mode, prompt, answers in order, prompt-template version): re-running a report, or adding a
baseline, re-asks only what is new.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tuneloop.config.schema import JudgeConfig
from tuneloop.data import Message
from tuneloop.evaluate.endpoints import ChatClient, api_key_from_env
from tuneloop.models.source import cache_dir as tuneloop_cache_dir
from tuneloop.tasks.base import mean_statistic

TEMPLATE_VERSION = "1"
JUDGE_MAX_TOKENS = 200
SYSTEM = "You are a strict, fair evaluator of answers written by AI assistants. You follow the rubric exactly."

POINTWISE = """Grade the answer to the prompt below.

Rubric:
{rubric}

Prompt:
{prompt}

Reference answer (a correct answer, for guidance):
{reference}

Answer to grade:
{answer}

Reply with JSON only: {{"score": <integer from 1 (worst) to 10 (best)>, "reason": "<one sentence>"}}"""

PAIRWISE = """Compare two answers to the prompt below.

Rubric:
{rubric}

Prompt:
{prompt}

Reference answer (a correct answer, for guidance):
{reference}

Answer A:
{a}

Answer B:
{b}

Reply with JSON only: {{"winner": "A" | "B" | "tie", "reason": "<one sentence>"}}"""


class JudgeCache:
    """One JSON file per verdict, named by the request's hash; written atomically (temp file + rename)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256(json.dumps([TEMPLATE_VERSION, *parts]).encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.folder / key[:2] / f"{key}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self.folder / key[:2] / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{random.randrange(1 << 30)}")
        temporary.write_text(json.dumps(value), encoding="utf-8")
        temporary.replace(path)


def _json_field(text: str, key: str) -> Any:
    """``key`` from the first JSON object in the judge's reply (judges add prose and fences around it)."""
    for match in re.finditer(r"\{[^{}]*\}", text, re.DOTALL):
        try:
            value = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and key in value:
            return value[key]
    return None


def parse_score(text: str) -> int | None:
    value = _json_field(text, "score")
    if value is None:
        match = re.search(r"score\W{0,5}(\d{1,2})", text, re.IGNORECASE)
        value = match.group(1) if match else None
    try:
        score = int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return score if 1 <= score <= 10 else None


def parse_winner(text: str) -> str | None:
    value = _json_field(text, "winner")
    if value is None:
        match = re.search(r"winner\W{0,5}(A|B|tie)\b", text, re.IGNORECASE)
        value = match.group(1) if match else None
    value = str(value).strip().lower() if value is not None else None
    return {"a": "A", "b": "B", "tie": "tie"}.get(value) if value else None


class Judge:
    """Asks the judge model, through the cache; ``calls`` counts requests that actually went out."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.client = ChatClient(
            "judge", config.base_url, config.model, api_key_from_env(config.api_key_env, "judge"), config.timeout_s
        )
        self.cache = JudgeCache(Path(config.cache_dir) if config.cache_dir else tuneloop_cache_dir() / "judge")
        self.calls = 0

    def _ask(self, mode: str, prompt: str, reference: str, answers: Sequence[str]) -> dict[str, Any]:
        key = JudgeCache.key(self.config.model, self.config.rubric, mode, prompt, reference, *answers)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if mode == "pointwise":
            text = POINTWISE.format(rubric=self.config.rubric, prompt=prompt, reference=reference, answer=answers[0])
        else:
            text = PAIRWISE.format(rubric=self.config.rubric, prompt=prompt, reference=reference, a=answers[0], b=answers[1])
        reply = self.client.complete([Message("system", SYSTEM), Message("user", text)], JUDGE_MAX_TOKENS)
        self.calls += 1
        verdict = {"reply": reply, "score": parse_score(reply)} if mode == "pointwise" else {"reply": reply, "winner": parse_winner(reply)}
        self.cache.put(key, verdict)
        return verdict

    def score(self, prompt: str, reference: str, answer: str) -> int | None:
        return self._ask("pointwise", prompt, reference, [answer])["score"]

    def prefer(self, prompt: str, reference: str, first: str, second: str) -> str | None:
        return self._ask("pairwise", prompt, reference, [first, second])["winner"]


def judged_indices(n: int, max_examples: int | None, seed: int) -> list[int]:
    if max_examples is None or max_examples >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_examples))


def _parallel(function: Callable[[int], Any], count: int, concurrency: int, tick: Callable[[int], None] | None) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = []
        for value in pool.map(function, range(count)):
            results.append(value)
            if tick is not None:
                tick(1)
    return results


def run_judge(
    config: JudgeConfig,
    prompts: Sequence[str],
    references: Sequence[str],
    outputs: dict[str, list[str]],
    seed: int,
    bootstrap_samples: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Judge verdicts per system (pointwise) or per baseline against the fine-tune (pairwise), with intervals."""
    judge = Judge(config)
    chosen = judged_indices(len(prompts), config.max_examples, seed)
    others = [s for s in outputs if s != "finetuned"]
    wanted = list(config.systems) if config.systems is not None else None
    unknown = sorted(set(wanted or []) - set(outputs))
    if unknown:
        raise ValueError(f"judge.systems: unknown system(s) {', '.join(unknown)}; evaluated: {', '.join(outputs)}")
    summary: dict[str, Any] = {"mode": config.mode, "model": config.model, "n": len(chosen)}
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress("judge", done, total)

    if config.mode == "pointwise":
        systems = wanted or list(outputs)
        total = len(systems) * len(chosen)
        for system in systems:
            scores = _parallel(
                lambda j, s=system: judge.score(prompts[chosen[j]], references[chosen[j]], outputs[s][chosen[j]]),
                len(chosen), config.concurrency, tick,
            )
            valid = [s for s in scores if s is not None]
            summary[system] = {
                "mean_score": sum(valid) / len(valid) if valid else None,
                "ci95": _interval(valid, bootstrap_samples, seed),
                "unparsed": len(scores) - len(valid),
                "scores": scores,
            }
    else:
        baselines = [s for s in (wanted or others) if s != "finetuned"]
        total = 2 * len(baselines) * len(chosen)
        for baseline in baselines:
            def both_orders(j: int, b: str = baseline) -> tuple[str | None, str | None]:
                i = chosen[j]
                ours, theirs = outputs["finetuned"][i], outputs[b][i]
                if ours.strip() == theirs.strip():
                    return "tie", "tie"  # nothing to judge, and nothing to pay for
                return judge.prefer(prompts[i], references[i], ours, theirs), judge.prefer(prompts[i], references[i], theirs, ours)

            verdicts = _parallel(both_orders, len(chosen), config.concurrency, lambda n: tick(2 * n))
            outcomes = [_combine(first, second) for first, second in verdicts]
            summary[baseline] = {
                "wins": outcomes.count(1.0),
                "losses": outcomes.count(0.0),
                "ties": outcomes.count(0.5),
                "win_rate": sum(outcomes) / len(outcomes) if outcomes else None,
                "ci95": _interval(outcomes, bootstrap_samples, seed),
                "position_consistency": (
                    sum(_consistent(a, b) for a, b in verdicts) / len(verdicts) if verdicts else None
                ),
            }
    summary["requests"] = judge.calls
    return summary


def _interval(values: Sequence[float], samples: int, seed: int) -> list[float] | None:
    """Bootstrap 95% interval of a mean (judged examples only; unparsed verdicts are left out)."""
    from tuneloop.evaluate.bootstrap import interval, replicates

    if not values or samples <= 0:
        return None
    return interval(replicates({"x": {"mean": mean_statistic(values)}}, samples, seed)["x"]["mean"])


def _combine(fine_first: str | None, fine_second: str | None) -> float:
    """1 if the fine-tune wins in both orders, 0 if it loses in both, else 0.5 (a tie or an inconsistent judge)."""
    if fine_first == "A" and fine_second == "B":
        return 1.0
    if fine_first == "B" and fine_second == "A":
        return 0.0
    return 0.5


def _consistent(fine_first: str | None, fine_second: str | None) -> bool:
    return (fine_first, fine_second) in {("A", "B"), ("B", "A"), ("tie", "tie")}
