"""Row shapes: the usual ways people store chat data, each turned into a :class:`Conversation`.

A registry, not an if/elif ladder: a shape knows how to recognise its keys and how to convert a row.
Adding a shape is adding one entry to :data:`SHAPES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.data.errors import DataError
from tuneloop.data.readers import RawRow, read_rows
from tuneloop.data.types import ROLES, Conversation, Message, RowRef


@dataclass(frozen=True)
class ShapeOptions:
    """Column names for tabular shapes (from the run config)."""

    text_column: str = "text"
    label_column: str = "label"


@dataclass(frozen=True)
class Shape:
    name: str
    description: str
    matches: Callable[[dict[str, Any], ShapeOptions], bool]
    convert: Callable[[RawRow, ShapeOptions], Conversation]


def _string(row: RawRow, key: str, *, allow_empty: bool = False) -> str:
    value = row.data.get(key)
    if value is None:
        raise DataError(row.ref, "missing", field=key)
    if not isinstance(value, str):
        raise DataError(row.ref, f"must be a string, got {type(value).__name__}", field=key)
    if not allow_empty and not value.strip():
        raise DataError(row.ref, "is empty", field=key)
    return value


def validate_turns(messages: list[Message], ref: RowRef, field: str) -> tuple[Message, ...]:
    """Roles known, system first only, user/assistant alternating, ending on a non-empty assistant turn."""
    if not messages:
        raise DataError(ref, "has no messages", field=field)
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise DataError(ref, f"unknown role {message.role!r}; use one of {', '.join(ROLES)}", f"{field}[{index}]")
        if message.role == "system" and index != 0:
            raise DataError(ref, "a system message may only come first", f"{field}[{index}]")
    turns = messages[1:] if messages[0].role == "system" else messages
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.role != expected:
            offset = len(messages) - len(turns)
            raise DataError(ref, f"expected a {expected} turn, got {message.role!r}", f"{field}[{index + offset}]")
    if not turns or turns[-1].role != "assistant":
        raise DataError(ref, "must end with an assistant turn (the answer to learn)", field)
    for index, message in enumerate(messages):
        if message.role != "system" and not message.content.strip():
            raise DataError(ref, f"empty {message.role} turn", f"{field}[{index}].content")
    return tuple(messages)


def _message_list(row: RawRow, key: str, role_key: str, content_key: str, role_names: dict[str, str]) -> list[Message]:
    value = row.data.get(key)
    if not isinstance(value, list):
        raise DataError(row.ref, f"must be a list of messages, got {type(value).__name__}", field=key)
    messages = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(row.ref, f"must be an object, got {type(item).__name__}", f"{key}[{index}]")
        role, content = item.get(role_key), item.get(content_key)
        if not isinstance(role, str):
            raise DataError(row.ref, "missing or not a string", f"{key}[{index}].{role_key}")
        if not isinstance(content, str):
            raise DataError(row.ref, "missing or not a string", f"{key}[{index}].{content_key}")
        messages.append(Message(role_names.get(role, role), content))
    return messages


def _from_messages(row: RawRow, options: ShapeOptions) -> Conversation:
    messages = validate_turns(_message_list(row, "messages", "role", "content", {}), row.ref, "messages")
    return Conversation(messages, row.ref, label=messages[-1].content)


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}


def _from_sharegpt(row: RawRow, options: ShapeOptions) -> Conversation:
    raw = _message_list(row, "conversations", "from", "value", SHAREGPT_ROLES)
    messages = validate_turns(raw, row.ref, "conversations")
    return Conversation(messages, row.ref, label=messages[-1].content)


def _from_alpaca(row: RawRow, options: ShapeOptions) -> Conversation:
    instruction = _string(row, "instruction")
    extra = row.data.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(row.ref, f"must be a string, got {type(extra).__name__}", field="input")
    output = _string(row, "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages: list[Message] = []
    if isinstance(row.data.get("system"), str) and row.data["system"].strip():
        messages.append(Message("system", row.data["system"]))
    messages += [Message("user", user), Message("assistant", output)]
    return Conversation(tuple(messages), row.ref, label=output)


def _from_labelled_text(row: RawRow, options: ShapeOptions) -> Conversation:
    text = _string(row, options.text_column)
    label = _string(row, options.label_column).strip()
    return Conversation((Message("user", text), Message("assistant", label)), row.ref, label=label)


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape("messages", "OpenAI chat: {messages: [{role, content}]}", lambda d, o: "messages" in d, _from_messages),
        Shape("sharegpt", "ShareGPT: {conversations: [{from, value}]}", lambda d, o: "conversations" in d, _from_sharegpt),
        Shape("alpaca", "{instruction, input?, output}", lambda d, o: "instruction" in d and "output" in d, _from_alpaca),
        Shape(
            "labelled_text",
            "classification rows: {<text_column>, <label_column>}",
            lambda d, o: o.text_column in d and o.label_column in d,
            _from_labelled_text,
        ),
    )
}


def detect_shape(row: RawRow, options: ShapeOptions) -> Shape:
    """The one shape whose keys the row has; ambiguity and no match are both errors with the row's place."""
    found = [shape for shape in SHAPES.values() if shape.matches(row.data, options)]
    if len(found) == 1:
        return found[0]
    keys = ", ".join(sorted(row.data)) or "(none)"
    if not found:
        if {"prompt", "chosen", "rejected"} <= set(row.data):
            raise DataError(row.ref, "preference pairs (prompt/chosen/rejected) need a preference method such as dpo")
        known = "; ".join(f"{s.name}: {s.description}" for s in SHAPES.values())
        raise DataError(row.ref, f"unrecognised row shape with keys [{keys}]. Known shapes: {known}")
    names = ", ".join(shape.name for shape in found)
    raise DataError(row.ref, f"ambiguous row: keys [{keys}] fit several shapes ({names}); remove the extra keys")


def conversations_from_rows(rows: Iterable[RawRow], options: ShapeOptions) -> Iterator[Conversation]:
    """Convert rows with the shape detected on the first one; every later row must have the same shape."""
    shape: Shape | None = None
    for row in rows:
        if shape is None:
            shape = detect_shape(row, options)
        elif not shape.matches(row.data, options):
            raise DataError(row.ref, f"row does not have the {shape.name} shape of the file's first row")
        yield shape.convert(row, options)


def load_conversations(path: str | Path, options: ShapeOptions | None = None) -> list[Conversation]:
    """Read and validate a whole data file; the first bad row raises :class:`DataError` naming it."""
    conversations = list(conversations_from_rows(read_rows(path), options or ShapeOptions()))
    if not conversations:
        raise DataError(str(path), "no rows")
    return conversations
