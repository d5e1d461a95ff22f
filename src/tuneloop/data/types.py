"""The validated, in-memory form of training data: conversations that remember where they came from."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RowRef:
    """Where a row lives on disk, so every later error can point at it."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """One training example: a system/user/assistant exchange ending with an assistant turn.

    ``label`` is the answer a classification task scores against (the final assistant turn); it is kept
    apart so audits and metrics need not re-parse messages.
    """

    messages: tuple[Message, ...]
    source: RowRef
    label: str | None = None

    @property
    def prompt(self) -> tuple[Message, ...]:
        """Everything before the final assistant turn: what the model sees at inference time."""
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        return self.messages[-1].content

    def with_system_prompt(self, system_prompt: str | None) -> Conversation:
        """Prepend ``system_prompt`` unless the conversation already has a system message."""
        if not system_prompt or self.messages[0].role == "system":
            return self
        return Conversation((Message("system", system_prompt), *self.messages), self.source, self.label)


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and labels (``-100`` where no loss is taken) for one conversation."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    source: RowRef

    @property
    def num_trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != -100)


@dataclass
class EncodingReport:
    """What happened while encoding a dataset: kept, dropped as too long, token statistics."""

    kept: int = 0
    dropped_too_long: list[str] = field(default_factory=list)
    max_tokens: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "kept": self.kept,
            "dropped_too_long": len(self.dropped_too_long),
            "dropped_rows": self.dropped_too_long[:50],
            "max_tokens": self.max_tokens,
            "total_tokens": self.total_tokens,
            "trained_tokens": self.trained_tokens,
        }
