"""Preference pairs (``prompt``/``chosen``/``rejected``): the input of preference methods such as DPO.

Kept apart from :data:`tuneloop.data.shapes.SHAPES` on purpose: those shapes yield :class:`Conversation`
for supervised fine-tuning, and a preference pair silently trained as SFT on ``chosen`` would drop half of
its signal. The data toolkit reads both kinds; training asks for the kind it can use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneloop.data.errors import DataError
from tuneloop.data.readers import RawRow
from tuneloop.data.shapes import Shape, ShapeOptions, validate_turns
from tuneloop.data.types import ROLES, Conversation, Message, RowRef


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred and a dispreferred answer."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    source: RowRef

    label = None  # preference pairs have no class label; audits skip label checks for them

    @property
    def messages(self) -> tuple[Message, ...]:
        """The chosen conversation: what an SFT warm-up or a preview would render."""
        return (*self.prompt, Message("assistant", self.chosen))

    @property
    def answer(self) -> str:
        return self.chosen

    def as_conversation(self) -> Conversation:
        return Conversation(self.messages, self.source, label=None)


def _prompt_messages(row: RawRow) -> list[Message]:
    value = row.data.get("prompt")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(row.ref, "is empty", field="prompt")
        return [Message("user", value)]
    if not isinstance(value, list) or not value:
        raise DataError(row.ref, "must be a string or a non-empty list of messages", field="prompt")
    messages = []
    for index, item in enumerate(value):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("role"), str)
            or not isinstance(item.get("content"), str)
        ):
            raise DataError(row.ref, "must be an object with string role and content", f"prompt[{index}]")
        if item["role"] not in ROLES:
            raise DataError(
                row.ref, f"unknown role {item['role']!r}; use one of {', '.join(ROLES)}", f"prompt[{index}]"
            )
        messages.append(Message(item["role"], item["content"]))
    return messages


def _answer(row: RawRow, key: str) -> str:
    """A string, or the TRL conversational form: a list holding one assistant message."""
    value = row.data.get(key)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role", "assistant") != "assistant":
            raise DataError(
                row.ref, f"must be an assistant message, got role {value[0].get('role')!r}", f"{key}[0]"
            )
        value = value[0].get("content")
    if value is None:
        raise DataError(row.ref, "missing", field=key)
    if not isinstance(value, str):
        raise DataError(row.ref, f"must be a string, got {type(value).__name__}", field=key)
    if not value.strip():
        raise DataError(row.ref, "is empty", field=key)
    return value


def _from_preference(row: RawRow, options: ShapeOptions) -> Any:
    prompt = _prompt_messages(row)
    chosen, rejected = _answer(row, "chosen"), _answer(row, "rejected")
    # validate the prompt as a conversation that the chosen answer completes: roles, order, non-empty turns
    validate_turns([*prompt, Message("assistant", chosen)], row.ref, "prompt")
    return PreferencePair(tuple(prompt), chosen, rejected, row.ref)


PREFERENCE_SHAPES: dict[str, Shape] = {
    "preference": Shape(
        "preference",
        "preference pairs: {prompt, chosen, rejected}",
        lambda d, o: {"prompt", "chosen", "rejected"} <= set(d),
        _from_preference,
    ),
}
