"""Evaluation stage: the fine-tuned model against its baselines on held-out data.

Every system answers the same test prompts, rendered with the run's stored chat template: the fine-tune,
the base model zero-shot (adapter disabled, no second copy of the weights) and the base model with
``few_shot_k`` training examples as prior turns. Predictions and metrics land in ``<output_dir>/eval/``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.data import ChatRenderer, Conversation, Message
from tuneloop.evaluate.generate import generate_greedy
from tuneloop.tasks import TaskSpec, get_task
from tuneloop.models import load_causal_lm, pick_device, resolve_model
from tuneloop.models.trained import TrainedModel, load_trained_model
from tuneloop.registry import update_record, write_json_atomic
from tuneloop.train.prepare import load_split

SYSTEMS = ("finetuned", "base", "few_shot")

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EvalResult:
    output_dir: Path
    metrics: dict[str, dict[str, Any]]
    predictions_path: Path
    seconds: float


def few_shot_examples(train: Sequence[Conversation], spec: TaskSpec, k: int, seed: int) -> list[Conversation]:
    """``k`` training examples, seeded; for classification one per label in turn, so no label is unseen."""
    rng = random.Random(seed)
    pool = list(train)
    rng.shuffle(pool)
    if not spec.labels:
        return pool[:k]
    by_label = {label: [c for c in pool if c.label == label] for label in spec.labels}
    chosen: list[Conversation] = []
    while len(chosen) < k and any(by_label.values()):
        for label in spec.labels:
            if by_label[label] and len(chosen) < k:
                chosen.append(by_label[label].pop())
    rng.shuffle(chosen)
    return chosen


def few_shot_prompt(prompt: Sequence[Message], shots: Sequence[Conversation]) -> list[Message]:
    """Shots become earlier user/assistant turns after the system message: the chat-native way to show examples."""
    system = [m for m in prompt[:1] if m.role == "system"]
    turns = [m for shot in shots for m in shot.messages if m.role != "system"]
    return [*system, *turns, *prompt[len(system) :]]


def run(config: RunConfig, *, progress: ProgressCallback | None = None) -> EvalResult:
    if config.test_file is None:
        raise ValueError("evaluation needs test_file in the config")
    started = time.perf_counter()
    setup = pick_device(config.precision)
    trained = load_trained_model(config.output_dir, setup)
    task = get_task(trained.spec.task)
    test = load_split(config, config.test_file, trained.spec)
    renderer = ChatRenderer(trained.tokenizer, trained.chat_format)
    references = [c.label if c.label is not None else c.answer for c in test]

    prompts: dict[str, list[list[int]]] = {
        "finetuned": [renderer.prompt_ids(c.prompt) for c in test],
    }
    if "base" in config.baselines:
        prompts["base"] = prompts["finetuned"]
    if "few_shot" in config.baselines and config.few_shot_k > 0:
        shots = few_shot_examples(load_split(config, config.train_file, trained.spec), trained.spec, config.few_shot_k, config.seed)
        prompts["few_shot"] = [renderer.prompt_ids(few_shot_prompt(c.prompt, shots)) for c in test]

    outputs: dict[str, list[str]] = {}
    for system, system_prompts in prompts.items():
        with _model_for(system, trained, setup) as model:
            done = 0

            def tick(n: int, system: str = system) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(system, done, len(system_prompts))

            ids = generate_greedy(
                model,
                system_prompts,
                pad_token_id=trained.tokenizer.pad_token_id,
                stop_token_ids=_stop_ids(trained),
                max_new_tokens=config.max_new_tokens,
                batch_size=config.eval_batch_size,
                on_batch=tick,
            )
        outputs[system] = [trained.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]

    predictions = {s: [task.parse_answer(o, trained.spec) for o in outs] for s, outs in outputs.items()}
    metrics = {s: task.score(predictions[s], references, trained.spec) for s in outputs}
    eval_dir = Path(config.output_dir) / "eval"
    write_json_atomic(eval_dir / "metrics.json", metrics)
    predictions_path = eval_dir / "predictions.jsonl"
    with predictions_path.open("w", encoding="utf-8") as handle:
        for i, conversation in enumerate(test):
            row: dict[str, Any] = {"source": str(conversation.source), "input": conversation.prompt[-1].content}
            row["expected"] = references[i]
            for system in outputs:
                row[system] = predictions[system][i]
                row[f"{system}_raw"] = outputs[system][i]
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    headline = {s: {k: metrics[s][k] for k in ("accuracy", "macro_f1") if k in metrics[s]} for s in metrics}
    update_record(Path(config.output_dir), eval={"test": str(config.test_file), "n": len(test), "headline": headline})
    return EvalResult(Path(config.output_dir), metrics, predictions_path, time.perf_counter() - started)


def _stop_ids(trained: TrainedModel) -> list[int]:
    ids = {trained.chat_format.eot_token_id}
    if trained.tokenizer.eos_token_id is not None:
        ids.add(trained.tokenizer.eos_token_id)
    return sorted(ids)


@contextmanager
def _model_for(system: str, trained: TrainedModel, setup: Any) -> Iterator[Any]:
    """The fine-tune itself, or the base model: the same weights with the adapter switched off."""
    if system == "finetuned":
        yield trained.model
    elif trained.is_adapter:
        with trained.model.disable_adapter():
            yield trained.model
    else:
        yield load_causal_lm(resolve_model(trained.base_model), setup.dtype, setup.device).eval()
