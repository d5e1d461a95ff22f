"""Answer with a trained run exactly as it was trained: stored system prompt, stored chat template."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuneloop.data import ChatRenderer, Message
from tuneloop.evaluate.generate import generate_greedy
from tuneloop.tasks import get_task
from tuneloop.models import pick_device
from tuneloop.models.trained import load_trained_model


@dataclass(frozen=True)
class Prediction:
    answer: str
    raw: str


class Predictor:
    """Loads a run's fine-tune once; ``predict`` for single inputs, ``reply`` for multi-turn chat."""

    def __init__(self, run_dir: Path, precision: str = "auto", max_new_tokens: int = 256) -> None:
        self.trained = load_trained_model(Path(run_dir), pick_device(precision))
        self.renderer = ChatRenderer(self.trained.tokenizer, self.trained.chat_format)
        self.task = get_task(self.trained.spec.task)
        self.max_new_tokens = max_new_tokens

    @property
    def system_prompt(self) -> str | None:
        return self.trained.spec.system_prompt

    def reply(self, messages: Sequence[Message], max_new_tokens: int | None = None) -> str:
        """The model's next assistant turn; the run's system prompt is added when ``messages`` has none."""
        if self.system_prompt and (not messages or messages[0].role != "system"):
            messages = [Message("system", self.system_prompt), *messages]
        tokenizer = self.trained.tokenizer
        stop = sorted({self.trained.chat_format.eot_token_id, tokenizer.eos_token_id} - {None})
        [ids] = generate_greedy(
            self.trained.model,
            [self.renderer.prompt_ids(messages)],
            pad_token_id=tokenizer.pad_token_id,
            stop_token_ids=stop,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            batch_size=1,
        )
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    def predict(self, text: str) -> Prediction:
        """One input through the task: the raw answer and the task's reading of it (e.g. a label)."""
        raw = self.reply([Message("user", text)])
        return Prediction(self.task.parse_answer(raw, self.trained.spec), raw)
