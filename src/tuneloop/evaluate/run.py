"""Evaluation stage: the fine-tuned model against its baselines on held-out data, with confidence.

Every system answers the same test prompts, rendered with the run's stored chat template: the fine-tune,
the base model zero-shot (adapter disabled, no second copy of the weights), the base model with
``few_shot_k`` training examples as prior turns, and any OpenAI-compatible endpoint listed in
``baselines``. The task scores each system; paired bootstrap intervals and tests say which differences
are real; the regression check scores base and fine-tune on general prompts; an optional LLM judge grades
answers; the gate decides. Everything lands in ``<output_dir>/eval/``: ``metrics.json`` (one entry per
system), ``predictions.jsonl``, ``gate.json`` and the self-contained ``report.html``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.config.schema import EndpointBaseline
from tuneloop.data import Conversation, Message
from tuneloop.evaluate import regression as regression_check
from tuneloop.evaluate.bootstrap import confidence_report
from tuneloop.evaluate.endpoints import ChatClient, api_key_from_env, complete_all
from tuneloop.evaluate.gate import GateResult, check_gate_names, evaluate_gate
from tuneloop.evaluate.systems import LocalModels, few_shot_examples, few_shot_prompt
from tuneloop.models import pick_device
from tuneloop.models.trained import load_trained_model
from tuneloop.registry import update_record, write_json_atomic
from tuneloop.tasks import Task, TaskSpec, get_task
from tuneloop.train.prepare import load_split

# Re-exported: these lived here before systems.py existed and are part of the module's surface.
__all__ = ["SYSTEMS", "EvalResult", "ProgressCallback", "few_shot_examples", "few_shot_prompt", "run"]

SYSTEMS = ("finetuned", "base", "few_shot")

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EvalResult:
    output_dir: Path
    metrics: dict[str, dict[str, Any]]
    predictions_path: Path
    seconds: float
    task: str = "classification"
    headline: tuple[str, ...] = ("accuracy", "macro_f1")
    gate: GateResult | None = None
    report_path: Path | None = None
    judge: dict[str, Any] | None = None


def _spec_for_eval(spec: TaskSpec, config: RunConfig) -> TaskSpec:
    """The run's stored spec, plus the JSON Schema from the config (read and checked now, before any generation)."""
    if config.json_schema is None:
        return spec
    from tuneloop.evaluate.json_metrics import schema_validator

    try:
        schema = json.loads(Path(config.json_schema).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"json_schema: {config.json_schema} not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config.json_schema}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    from jsonschema.exceptions import SchemaError

    try:
        schema_validator(schema)
    except SchemaError as exc:
        raise ValueError(f"{config.json_schema}: not a valid JSON Schema: {exc.message}") from None
    return replace(spec, json_schema=schema)


def _counter(progress: ProgressCallback | None, name: str, total: int) -> Callable[[int], None]:
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(name, done, total)

    return tick


def _prompt_text(prompt: Sequence[Message]) -> str:
    """The test prompt as a judge or a report reads it: the system instruction, then the turns."""
    return "\n\n".join(f"[{m.role}]\n{m.content}" for m in prompt)


def run(config: RunConfig, *, progress: ProgressCallback | None = None) -> EvalResult:
    if config.test_file is None:
        raise ValueError("evaluation needs test_file in the config")
    started = time.perf_counter()
    setup = pick_device(config.precision)
    trained = load_trained_model(config.output_dir, setup)
    task = get_task(trained.spec.task)
    spec = _spec_for_eval(trained.spec, config)
    test = load_split(config, config.test_file, spec)
    references = [task.reference_of(c, spec) for c in test]
    endpoints = [b for b in config.baselines if isinstance(b, EndpointBaseline)]
    wanted = ["finetuned", *(b for b in config.baselines if isinstance(b, str))]
    if "few_shot" in wanted and config.few_shot_k == 0:
        wanted.remove("few_shot")
    metric_names = _metric_names(task, references, spec)
    if config.judge is not None and config.judge.mode == "pointwise":
        metric_names.append("judge_score")
    check_gate_names(config.gate, metric_names, [*wanted, *(e.name for e in endpoints)])
    if config.gate is not None and config.gate.max_format_bleed is not None and task.looks_like_output is None:
        raise ValueError(f"gate.max_format_bleed: task {task.name} has no output format to detect")

    # API keys are looked up now: a missing one should stop the run before minutes of generation, not after.
    clients = {
        e.name: ChatClient(e.name, e.base_url, e.model, api_key_from_env(e.api_key_env, e.name), e.timeout_s) for e in endpoints
    }
    if config.judge is not None:
        api_key_from_env(config.judge.api_key_env, "judge")

    shots: list[Conversation] = []
    if config.few_shot_k > 0 and ("few_shot" in wanted or any(e.few_shot for e in endpoints)):
        train = load_split(config, config.train_file, spec)
        shots = few_shot_examples(train, spec, config.few_shot_k, config.seed)
    prompts = {s: [list(c.prompt) for c in test] for s in wanted}
    if "few_shot" in prompts:
        prompts["few_shot"] = [few_shot_prompt(c.prompt, shots) for c in test]

    models = LocalModels(trained, setup)
    outputs: dict[str, list[str]] = {}
    for system, system_prompts in prompts.items():
        outputs[system] = models.answer(
            "finetuned" if system == "finetuned" else "base",
            system_prompts,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.eval_batch_size,
            on_batch=_counter(progress, system, len(system_prompts)),
        )
    for endpoint in endpoints:
        conversations = [few_shot_prompt(c.prompt, shots) if endpoint.few_shot else list(c.prompt) for c in test]
        outputs[endpoint.name] = complete_all(
            clients[endpoint.name],
            conversations,
            endpoint.max_tokens or config.max_new_tokens,
            endpoint.concurrency,
            _counter(progress, endpoint.name, len(conversations)),
        )

    predictions = {s: [task.parse_answer(o, spec) for o in outs] for s, outs in outputs.items()}
    metrics: dict[str, dict[str, Any]] = {s: task.score(predictions[s], references, spec) for s in outputs}
    statistics = {s: task.statistics(predictions[s], references, spec) for s in outputs} if task.statistics else {}
    ci95, comparisons = confidence_report(statistics, "finetuned", config.bootstrap_samples, config.seed)
    for system in metrics:
        metrics[system]["ci95"] = ci95.get(system, {})
    metrics["finetuned"]["comparisons"] = comparisons
    # Said outright, so that an empty `comparisons` reads as "nothing to compare with", not as "no difference".
    metrics["finetuned"]["baselines"] = [s for s in metrics if s != "finetuned"]

    if config.regression_check:
        regression_systems = [s for s in ("base", "finetuned") if s in metrics]
        for system, result in _regression(config, models, task, spec, regression_systems, progress).items():
            metrics[system]["regression"] = result

    judge = None
    if config.judge is not None:
        from tuneloop.evaluate.judge import run_judge

        judge = run_judge(
            config.judge,
            [_prompt_text(c.prompt) for c in test],
            [c.answer for c in test],
            outputs,
            config.seed,
            config.bootstrap_samples,
            progress,
        )
        _attach_judge(metrics, judge)

    gate = evaluate_gate(config.gate, metrics) if config.gate is not None else None
    eval_dir = Path(config.output_dir) / "eval"
    write_json_atomic(eval_dir / "metrics.json", metrics)
    for name, content in (("judge.json", judge), ("gate.json", gate.as_dict() if gate is not None else None)):
        if content is not None:
            write_json_atomic(eval_dir / name, content)
        else:
            (eval_dir / name).unlink(missing_ok=True)  # a stale verdict from an earlier config must not linger
    predictions_path = _write_predictions(eval_dir / "predictions.jsonl", test, references, outputs, predictions)
    headline = {s: {k: metrics[s].get(k) for k in task.headline} for s in metrics}
    result = EvalResult(
        Path(config.output_dir), metrics, predictions_path, time.perf_counter() - started, task.name,
        task.headline, gate, None, judge,
    )
    from tuneloop.evaluate.report import write_report

    inputs = [c.prompt[-1].content for c in test]
    report_path = write_report(eval_dir / "report.html", result, config, spec, inputs, references, outputs, predictions)
    result = replace(result, report_path=report_path, seconds=time.perf_counter() - started)
    update_record(
        Path(config.output_dir),
        eval={
            "test": str(config.test_file),
            "n": len(test),
            "headline": headline,
            "ci95": {s: metrics[s]["ci95"] for s in metrics},
            "gate": gate.as_dict() if gate is not None else None,
            "seconds": round(result.seconds, 2),
        },
    )
    return result


def _metric_names(task: Task, references: Sequence[str], spec: TaskSpec) -> list[str]:
    """The numeric metrics this task reports, found by scoring the references against themselves (cheap)."""
    scored = task.score(references, references, spec)
    return [k for k, v in scored.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _regression(
    config: RunConfig,
    models: LocalModels,
    task: Task,
    spec: TaskSpec,
    systems: Sequence[str],
    progress: ProgressCallback | None,
) -> dict[str, dict[str, Any]]:
    """General prompts for ``systems`` (base and fine-tune; the fine-tune alone with ``baselines: []``)."""
    prompts = regression_check.load_prompts(config.regression_prompts)
    conversations = [[Message("user", p.prompt)] for p in prompts]
    scored = {}
    for system in systems:
        answers = models.answer(
            system,
            conversations,
            max_new_tokens=config.regression_max_new_tokens,
            batch_size=config.eval_batch_size,
            on_batch=_counter(progress, f"regression {system}", len(conversations)),
        )
        scored[system] = regression_check.score_system(prompts, answers, task, spec)
    has_bleed = task.looks_like_output is not None
    stats = {s: regression_check.statistics(scored[s], has_bleed) for s in scored}
    ci95, comparisons = confidence_report(stats, "finetuned", config.bootstrap_samples, config.seed)
    for system in scored:
        scored[system]["ci95"] = ci95.get(system, {})
    scored["finetuned"]["vs_base"] = comparisons.get("base", {})
    return scored


def _attach_judge(metrics: dict[str, dict[str, Any]], judge: dict[str, Any]) -> None:
    """Pointwise: each judged system gets ``judge_score``; pairwise: the fine-tune gets a win rate per baseline."""
    if judge["mode"] == "pointwise":
        for system in metrics:
            if isinstance(judge.get(system), dict):
                metrics[system]["judge_score"] = judge[system]["mean_score"]
                metrics[system]["ci95"]["judge_score"] = judge[system]["ci95"]
    else:
        metrics["finetuned"]["judge_win_rate"] = {
            b: {k: v for k, v in entry.items()} for b, entry in judge.items() if isinstance(entry, dict)
        }


def _write_predictions(
    path: Path,
    test: Sequence[Conversation],
    references: Sequence[str],
    outputs: dict[str, list[str]],
    predictions: dict[str, list[str]],
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for i, conversation in enumerate(test):
            row: dict[str, Any] = {"source": str(conversation.source), "input": conversation.prompt[-1].content}
            row["expected"] = references[i]
            for system in outputs:
                row[system] = predictions[system][i]
                row[f"{system}_raw"] = outputs[system][i]
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
