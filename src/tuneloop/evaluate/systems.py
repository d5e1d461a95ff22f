"""The systems an evaluation compares, and how each one answers a list of prompts.

Local systems share one copy of the weights: the fine-tune, and the base model as the same PEFT model
with its adapter switched off (a full fine-tune loads the base once, on first use). Endpoint baselines
answer over HTTP. Every system returns raw text; the task turns it into predictions.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tuneloop.data import ChatRenderer, Conversation, Message
from tuneloop.evaluate.generate import generate_greedy
from tuneloop.models import DeviceSetup, load_causal_lm, resolve_model
from tuneloop.models.trained import TrainedModel
from tuneloop.tasks import TaskSpec

Tick = Callable[[int], None]


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
    """Shots become earlier user/assistant turns after the system message: the chat-native way to show examples.

    All prompts of the baseline then share the system message and the shots as one token prefix, which
    generation computes once (:mod:`tuneloop.evaluate.generate`).
    """
    system = [m for m in prompt[:1] if m.role == "system"]
    turns = [m for shot in shots for m in shot.messages if m.role != "system"]
    return [*system, *turns, *prompt[len(system) :]]


class LocalModels:
    """The fine-tune and its base model, for generation; the base is never a second copy for an adapter run."""

    def __init__(self, trained: TrainedModel, setup: DeviceSetup) -> None:
        self.trained = trained
        self.setup = setup
        self.renderer = ChatRenderer(trained.tokenizer, trained.chat_format)
        self._base: Any = None

    @property
    def stop_ids(self) -> list[int]:
        ids = {self.trained.chat_format.eot_token_id}
        if self.trained.tokenizer.eos_token_id is not None:
            ids.add(self.trained.tokenizer.eos_token_id)
        return sorted(ids)

    @contextmanager
    def model(self, which: str) -> Iterator[Any]:
        """``finetuned`` or ``base`` (the same weights with the adapter switched off)."""
        if which == "finetuned":
            yield self.trained.model
        elif self.trained.is_adapter:
            with self.trained.model.disable_adapter():
                yield self.trained.model
        else:
            if self._base is None:
                source = resolve_model(self.trained.base_model)
                self._base = load_causal_lm(source, self.setup.dtype, self.setup.device).eval()
            yield self._base

    def answer(
        self,
        which: str,
        prompts: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int,
        batch_size: int,
        on_batch: Tick | None = None,
    ) -> list[str]:
        ids = [self.renderer.prompt_ids(p) for p in prompts]
        with self.model(which) as model:
            generated = generate_greedy(
                model,
                ids,
                pad_token_id=self.trained.tokenizer.pad_token_id,
                stop_token_ids=self.stop_ids,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                on_batch=on_batch,
            )
        return [self.trained.tokenizer.decode(t, skip_special_tokens=True).strip() for t in generated]
